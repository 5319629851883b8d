"""Scoring captions against scenes: exact %, per-attribute accuracy and the bits a caption got right.

A generated caption is parsed with the scenes grammar (`jobs.scene_grammar`) and matched to the ground
truth object by object:

    1. a predicted object in the same grid cell as a true one is its match (position right);
    2. true objects left over are paired, in caption order, with predicted objects left over
       (position wrong, the other attributes still scored);
    3. true objects with no partner score nothing. Extra predicted objects cost the count.

Per image: count right (as many objects as the truth), and per true object colour / shape / size /
position right. "Bits recovered" adds the information of each attribute it got right
(`scene_grammar.attribute_bits`; position's share is log2(cells choose k) / k per object), so a
perfect caption recovers exactly the image's bits and a caption that parses to nothing recovers 0.
The ground truth is the reference caption parsed back (it is rendered from the annotations, and the
tests check the round trip), so a prepared Parquet split needs no extra column.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from jobs.scene_grammar import Scene, SceneObject, SceneSpec, attribute_bits, parse_caption

ATTRIBUTES = ("colour", "shape", "size", "position")


@dataclass
class ImageScore:
    parsed: bool
    exact: bool
    count_ok: bool
    hits: dict[str, int]  # attribute -> true objects it got right
    objects_ok: int  # true objects with every attribute right
    objects: int  # true objects
    bits: float  # the image's information
    bits_recovered: float


def _match(pred: Scene, truth: Scene) -> list[tuple[SceneObject, SceneObject | None]]:
    """(true object, its predicted partner or None), per the rules in the module docstring."""
    by_cell = {o.cell: o for o in pred.objects}
    pairs: list[tuple[SceneObject, SceneObject | None]] = []
    used: set[int] = set()
    leftover = []
    for obj in truth.objects:
        if obj.cell in by_cell:
            pairs.append((obj, by_cell[obj.cell]))
            used.add(obj.cell)
        else:
            leftover.append(obj)
    spare = [o for o in pred.objects if o.cell not in used]
    for i, obj in enumerate(leftover):
        pairs.append((obj, spare[i] if i < len(spare) else None))
    return pairs


def score_caption(caption: str, truth: Scene, spec: SceneSpec) -> ImageScore:
    """One generated caption against its scene."""
    bits = attribute_bits(spec)
    k = len(truth.objects)
    position_bits = math.log2(math.comb(spec.cells, k)) / k
    per_object = {"colour": bits["colour"], "shape": bits["shape"], "size": bits["size"], "position": position_bits}
    total = bits["count"] + k * (bits["colour"] + bits["shape"] + bits["size"]) + math.log2(math.comb(spec.cells, k))
    pred = parse_caption(caption, spec)
    hits = dict.fromkeys(ATTRIBUTES, 0)
    if pred is None:
        return ImageScore(False, False, False, hits, 0, k, total, 0.0)
    recovered = 0.0
    count_ok = len(pred.objects) == k
    if count_ok:
        recovered += bits["count"]
    objects_ok = 0
    for obj, guess in _match(pred, truth):
        if guess is None:
            continue
        right = {
            "colour": guess.colour == obj.colour,
            "shape": guess.shape == obj.shape,
            "size": guess.size == obj.size,
            "position": guess.cell == obj.cell,
        }
        for name, ok in right.items():
            hits[name] += ok
            recovered += per_object[name] * ok
        objects_ok += all(right.values())
    exact = pred.objects == truth.objects
    return ImageScore(True, exact, count_ok, hits, objects_ok, k, total, recovered)


def scene_report(captions: Sequence[str], references: Sequence[Sequence[str]], spec: SceneSpec) -> dict[str, float]:
    """Split-level scores (percentages, and bits per image); references[i][0] is image i's scene.

    Raises ValueError when a reference does not parse: then the data is not this spec's scenes set.
    """
    if len(captions) != len(references):
        raise ValueError(f"{len(captions)} captions for {len(references)} images")
    scores = []
    for i, (caption, refs) in enumerate(zip(captions, references, strict=True)):
        truth = parse_caption(refs[0], spec) if refs else None
        if truth is None:
            raise ValueError(f"reference caption of image {i} is not a scene of this spec: {refs[:1]!r}")
        scores.append(score_caption(caption, truth, spec))
    n = max(len(scores), 1)
    objects = max(sum(s.objects for s in scores), 1)
    out = {
        "scene_exact_pct": 100.0 * sum(s.exact for s in scores) / n,
        "scene_parsed_pct": 100.0 * sum(s.parsed for s in scores) / n,
        "scene_count_acc": 100.0 * sum(s.count_ok for s in scores) / n,
        "scene_object_acc": 100.0 * sum(s.objects_ok for s in scores) / objects,
        "scene_bits_per_image": sum(s.bits for s in scores) / n,
        "scene_bits_recovered": sum(s.bits_recovered for s in scores) / n,
    }
    for name in ATTRIBUTES:
        out[f"scene_{name}_acc"] = 100.0 * sum(s.hits[name] for s in scores) / objects
    out["scene_bits_recovered_pct"] = 100.0 * out["scene_bits_recovered"] / max(out["scene_bits_per_image"], 1e-9)
    return out
