"""The `scenes` set: images whose information content we control, written in COCO layout.

    python -m jobs.make_scenes --out data/scenes --train 6000 --val 300 --compo 300 --prepared data/scenes-pq

Each image holds `--min-objects`..`--max-objects` objects, each in its own cell of a G x G grid, with a
colour, a shape and a size; its caption names every object (grammar in `jobs.scene_grammar`):

    "a small red circle at the top left and a large blue square at the bottom right"

Output (a COCO download's layout, so `jobs.prepare` reads it unchanged):

    DIR/annotations/captions_SPLIT.json    one caption per image (a scene has exactly one)
    DIR/annotations/instances_SPLIT.json   one instance per object: bbox, category = its (colour, shape)
                                           class (ids 1..C*S), plus the ground truth "scene_object"
                                           {cell, size, colour, shape}
    DIR/SPLIT/<image_id:012d>.png          PNG
    DIR/scenes.json                        the spec, bits per image and per attribute

Splits: `train`; `val`, drawn like train (random hold-out); `compo` (with --holdout-every N > 0), scenes
that each hold at least one (colour, shape) pair train never shows: compositional generalisation.
With `--prepared OUT` every split also goes through `jobs.prepare` and scenes.json is copied to OUT,
where `jobs.evaluate` finds it. Everything derives from `--seed`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from jobs.scene_grammar import (
    PALETTE,
    SIZE_FRACTION,
    SPEC_FILE,
    Scene,
    SceneObject,
    SceneSpec,
    SceneSpecError,
    attribute_bits,
    bits_per_image,
    render_caption,
    write_spec,
)

SUPERSAMPLE = 4  # draw at 4x and downsample: antialiased edges
BACKGROUND_RANGE = (175, 245)  # light grey "paper": every colour is darker than it in some channel


def random_scene(rng: random.Random, spec: SceneSpec, split: str) -> Scene:
    """One scene; train avoids the held-out pairs, `compo` holds at least one of them."""
    held = spec.held_out_pairs()
    for _ in range(10_000):
        k = rng.randint(spec.min_objects, spec.max_objects)
        cells = rng.sample(range(spec.cells), k)
        objects = [
            SceneObject(cell, rng.choice(spec.size_names), rng.choice(spec.colour_names), rng.choice(spec.shape_names))
            for cell in cells
        ]
        pairs = {(o.colour, o.shape) for o in objects}
        if split == "compo" and not pairs & held:
            continue
        if split != "compo" and pairs & held:
            continue
        return Scene(objects)
    raise SceneSpecError(f"could not draw a {split} scene: the hold-out leaves too few pairs")


def draw_scene(rng: random.Random, scene: Scene, spec: SceneSpec) -> tuple[Image.Image, list[list[float]]]:
    """The image and one bbox [x, y, w, h] per object (in scene order)."""
    size = spec.image_size
    big = size * SUPERSAMPLE
    cell = big / spec.grid
    grey = rng.randint(*BACKGROUND_RANGE)
    tint = tuple(max(0, min(255, grey + rng.randint(-10, 10))) for _ in range(3))
    img = Image.new("RGB", (big, big), tint)
    draw = ImageDraw.Draw(img)
    boxes = []
    for obj in scene.objects:
        row, col = divmod(obj.cell, spec.grid)
        radius = SIZE_FRACTION[obj.size or "large"] * cell / 2
        slack = cell / 2 - radius  # jitter inside the cell; the object never crosses into the next one
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
        fill = tuple(max(0, min(255, v + rng.randint(-15, 15))) for v in PALETTE[obj.colour])
        if obj.shape == "circle":
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
        elif obj.shape == "triangle":
            pts = [
                (cx + radius * math.cos(a), cy + radius * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
            ]
            draw.polygon(pts, fill=fill)
        else:  # diamond
            draw.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=fill)
        s = SUPERSAMPLE
        boxes.append(
            [
                round((cx - radius) / s, 2),
                round((cy - radius) / s, 2),
                round(2 * radius / s, 2),
                round(2 * radius / s, 2),
            ]
        )
    return img.resize((size, size), Image.Resampling.LANCZOS), boxes


def write_split(out: Path, split: str, count: int, spec: SceneSpec, rng: random.Random, first_id: int) -> int:
    """Images + captions + instances of one split; returns the next free image id."""
    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, caption_anns, instance_anns = [], [], []
    seen: set[str] = set()
    for offset in range(count):
        image_id = first_id + offset
        while True:  # redraw the rare exact duplicate image
            scene = random_scene(rng, spec, split)
            img, boxes = draw_scene(rng, scene, spec)
            digest = hashlib.sha256(img.tobytes()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                break
        file_name = f"{image_id:012d}.png"
        img.save(image_dir / file_name, format="PNG")
        images.append({"id": image_id, "file_name": file_name, "width": spec.image_size, "height": spec.image_size})
        caption_anns.append({"id": len(caption_anns) + 1, "image_id": image_id, "caption": render_caption(scene, spec)})
        for obj, box in zip(scene.objects, boxes, strict=True):
            instance_anns.append(
                {
                    "id": len(instance_anns) + 1,
                    "image_id": image_id,
                    "category_id": spec.category_id(obj.colour, obj.shape),
                    "bbox": box,
                    "area": round(box[2] * box[3], 2),
                    "iscrowd": 0,
                    "scene_object": {"cell": obj.cell, "size": obj.size, "colour": obj.colour, "shape": obj.shape},
                }
            )
    info = {"description": f"VL-JEPA synthetic scenes ({split})", "version": "1.0", "year": 2026}
    categories = [
        {"id": spec.category_id(c, s), "name": f"{c} {s}", "supercategory": s, "colour": c, "shape": s}
        for c, s in spec.classes()
    ]
    ann_dir = out / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    _write_json(ann_dir / f"captions_{split}.json", {"info": info, "images": images, "annotations": caption_anns})
    _write_json(
        ann_dir / f"instances_{split}.json",
        {"info": info, "images": images, "annotations": instance_anns, "categories": categories},
    )
    return first_id + count


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    tmp.replace(path)


def make_scenes(out: Path, spec: SceneSpec, *, train: int, val: int, compo: int = 0, seed: int = 0) -> dict:
    """Write every split and scenes.json; returns {split: images} plus the bits."""
    if compo and not spec.holdout_every:
        raise SceneSpecError("a compo split needs --holdout-every >= 2 (pairs to hold out of train)")
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": train, "val": val, "compo": compo}
    next_id, written = 1, {}
    for split, n in counts.items():
        if n > 0:  # one RNG per split, so resizing one split leaves the others' images unchanged
            next_id = write_split(out, split, n, spec, random.Random(f"{seed}/{split}"), next_id)
            written[split] = n
    held = sorted(f"{c} {s}" for c, s in spec.held_out_pairs())
    write_spec(out, spec, {"splits": written, "held_out_pairs": held, "seed": seed})
    return {"splits": written, "bits_per_image": bits_per_image(spec), "attribute_bits": attribute_bits(spec)}


def prepare_all(raw: Path, prepared: Path, splits: Sequence[str], image_size: int) -> None:
    """Run `jobs.prepare` (unchanged) on every split and put scenes.json beside the shards."""
    from jobs import prepare

    for split in splits:
        argv = ["--coco-root", str(raw), "--split", split, "--out", str(prepared)]
        if prepare.main([*argv, "--image-size", str(image_size), "--image-format", "png"]) != 0:
            raise SystemExit(f"make_scenes: prepare failed on split {split}")
    shutil.copyfile(raw / SPEC_FILE, prepared / SPEC_FILE)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.make_scenes", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="dataset root to write (COCO layout)")
    p.add_argument("--train", type=int, default=6000, help="train images")
    p.add_argument("--val", type=int, default=300, help="random held-out images (same distribution as train)")
    p.add_argument("--compo", type=int, default=300, help="compositional held-out images (needs --holdout-every)")
    p.add_argument("--min-objects", type=int, default=2)
    p.add_argument("--max-objects", type=int, default=3)
    p.add_argument("--colours", type=int, default=4, help=f"1..{len(PALETTE)}")
    p.add_argument("--shapes", type=int, default=2, help="1..4 (circle, square, triangle, diamond)")
    p.add_argument("--sizes", type=int, default=2, help="1..2 (small, large)")
    p.add_argument("--grid", type=int, default=3, help="G: objects sit in the cells of a G x G grid")
    p.add_argument("--image-size", type=int, default=24)
    p.add_argument(
        "--holdout-every", type=int, default=4, help="every Nth (colour, shape) pair never in train; 0 = none"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prepared", type=Path, default=None, help="also run jobs.prepare on every split into this root")
    args = p.parse_args(argv)
    try:
        spec = SceneSpec(
            min_objects=args.min_objects,
            max_objects=args.max_objects,
            colours=args.colours,
            shapes=args.shapes,
            sizes=args.sizes,
            grid=args.grid,
            image_size=args.image_size,
            holdout_every=args.holdout_every,
        )
        if args.train < 1 or args.val < 0 or args.compo < 0:
            raise SceneSpecError("need --train >= 1, --val >= 0 and --compo >= 0")
        summary = make_scenes(
            args.out,
            spec,
            train=args.train,
            val=args.val,
            compo=args.compo if args.holdout_every else 0,
            seed=args.seed,
        )
    except SceneSpecError as exc:
        print(f"make_scenes: error: {exc}", file=sys.stderr)
        return 2
    per_attr = ", ".join(f"{k} {v:.2f}" for k, v in summary["attribute_bits"].items())
    splits = ", ".join(f"{n} {s}" for s, n in summary["splits"].items())
    print(f"make_scenes: wrote {splits} images to {args.out}")
    print(f"make_scenes: {summary['bits_per_image']:.2f} bits per image (per attribute: {per_attr})")
    if args.prepared is not None:
        prepare_all(args.out, args.prepared, list(summary["splits"]), spec.image_size)
        print(f"make_scenes: prepared every split into {args.prepared}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
