"""COCO annotation files -> validated per-image records, read with pycocotools.

Used by `jobs.prepare`. Everything here happens before any image is read or any output is written,
so an unusable annotation file (missing, not JSON, not COCO-shaped) stops the job with a
`PrepareError` and nothing half-written. Bad *records* are not errors: each becomes a `skipped`
entry with its reason (bad_image_record, duplicate_image_id, no_captions).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path


class PrepareError(Exception):
    """Input the job cannot prepare at all (exit code 2); nothing has been written when it is raised."""


@dataclass
class Record:
    image_id: int
    file_name: str
    captions: list[str]
    category_ids: list[int]


@dataclass
class Annotations:
    """What the annotation files say about one split, after validation."""

    records: list[Record]  # images with at least one caption, sorted by image_id
    skipped: list[dict] = field(default_factory=list)  # annotation-level skips (no captions, duplicates...)
    captions_dropped: int = 0  # empty / whitespace-only / non-string captions, malformed caption entries
    orphan_captions: int = 0  # caption annotations whose image_id names no image entry
    files: list[dict] = field(default_factory=list)  # [{file, bytes, sha256}] of every file read
    categories: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Annotations (pycocotools)


def load_annotations(coco_root: Path, split: str, *, limit: int | None = None) -> Annotations:
    """Read and validate captions_SPLIT.json (+ instances_SPLIT.json when present)."""
    ann_dir = coco_root / "annotations"
    captions_path = ann_dir / f"captions_{split}.json"
    if not captions_path.is_file():
        raise PrepareError(f"missing annotation file {captions_path} (expected COCO captions for split {split!r})")
    captions_data, captions_info = _read_coco_json(captions_path)
    out = Annotations(records=[], files=[captions_info])

    # Image entries: drop malformed ones and later duplicates of an id *before* pycocotools indexes them
    # (its index is a dict, so a duplicate id would silently replace the first entry).
    images: list[dict] = []
    first_name: dict[int, str] = {}
    for entry in captions_data["images"]:
        image_id = entry.get("id") if isinstance(entry, dict) else None
        file_name = entry.get("file_name") if isinstance(entry, dict) else None
        if type(image_id) is not int or not isinstance(file_name, str) or not file_name.strip():
            out.skipped.append(skip_record(image_id, file_name, "bad_image_record", f"image entry {str(entry)[:120]}"))
        elif image_id in first_name:
            detail = f"image id {image_id} already listed for {first_name[image_id]}"
            out.skipped.append(skip_record(image_id, file_name, "duplicate_image_id", detail))
        else:
            first_name[image_id] = file_name
            images.append(entry)
    anns = [a for a in captions_data["annotations"] if _valid_annotation(a)]
    bad_anns = len(captions_data["annotations"]) - len(anns)
    out.orphan_captions = sum(1 for a in anns if a["image_id"] not in first_name)
    captions_coco = _index({**captions_data, "images": images, "annotations": anns})

    instances_coco = None
    instances_path = ann_dir / f"instances_{split}.json"
    if instances_path.exists():
        instances_data, instances_info = _read_coco_json(instances_path, need_categories=True)
        out.files.append(instances_info)
        inst_anns = [a for a in instances_data["annotations"] if _valid_annotation(a)]
        instances_coco = _index({**instances_data, "annotations": inst_anns})
        out.categories = sorted(
            (
                {"id": c["id"], "name": c.get("name", ""), "supercategory": c.get("supercategory", "")}
                for c in instances_data["categories"]
            ),
            key=lambda c: c["id"],
        )

    image_ids = sorted(captions_coco.getImgIds())
    if limit is not None:
        image_ids = image_ids[:limit]
    out.captions_dropped = bad_anns
    for image_id in image_ids:
        info = captions_coco.loadImgs(image_id)[0]
        raw = [a.get("caption") for a in captions_coco.loadAnns(captions_coco.getAnnIds(imgIds=[image_id]))]
        # Empty and whitespace-only captions carry nothing to learn; non-ASCII and very long ones are kept
        # whole (truncation to the model's length is the training input's job).
        captions = [c.strip() for c in raw if isinstance(c, str) and c.strip()]
        out.captions_dropped += len(raw) - len(captions)
        if not captions:
            detail = f"{len(raw)} caption annotation(s), none with text" if raw else "no caption annotations"
            out.skipped.append(skip_record(image_id, info["file_name"], "no_captions", detail))
            continue
        category_ids: list[int] = []
        if instances_coco is not None:
            inst = instances_coco.loadAnns(instances_coco.getAnnIds(imgIds=[image_id]))
            category_ids = sorted({a["category_id"] for a in inst if type(a.get("category_id")) is int})
        out.records.append(Record(image_id, info["file_name"], captions, category_ids))
    return out


def _read_coco_json(path: Path, *, need_categories: bool = False) -> tuple[dict, dict]:
    """Parse one annotation file; anything that is not COCO-shaped JSON is a PrepareError naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PrepareError(f"cannot read annotation file {path}: {exc}") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PrepareError(f"malformed annotation file {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PrepareError(f"malformed annotation file {path}: top level is {type(data).__name__}, not an object")
    needed = ("images", "annotations", "categories") if need_categories else ("images", "annotations")
    for key in needed:
        if not isinstance(data.get(key), list):
            raise PrepareError(f"malformed annotation file {path}: no {key!r} list")
    if need_categories and not all(isinstance(c, dict) and "id" in c for c in data["categories"]):
        raise PrepareError(f"malformed annotation file {path}: a category has no 'id'")
    info = {"file": path.name, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    return data, info


def _valid_annotation(ann: object) -> bool:
    """pycocotools indexes annotations by `id` and `image_id`: both must be present and hashable."""
    return isinstance(ann, dict) and type(ann.get("image_id")) is int and isinstance(ann.get("id"), int | str)


def _index(dataset: dict):
    """A pycocotools COCO index over an already-parsed dataset (it prints progress; keep the console clean)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def skip_record(image_id, file_name, reason: str, detail: str = "") -> dict:
    return {
        "image_id": image_id if type(image_id) is int else None,
        "file_name": file_name if isinstance(file_name, str) else "",
        "reason": reason,
        "detail": detail,
    }
