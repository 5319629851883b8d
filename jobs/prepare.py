"""COCO (captions + instances) -> Parquet shards + manifest, decoded and resized in parallel by Ray Data.

    python -m jobs.prepare --coco-root /data/coco --split train2017 --out /data/coco-prepared --image-size 256

reads  COCO_ROOT/annotations/captions_SPLIT.json    (required; pycocotools)
       COCO_ROOT/annotations/instances_SPLIT.json   (optional: category ids per image)
       COCO_ROOT/SPLIT/<file_name>                  (the images)
writes OUT/SPLIT/part-00000.parquet ...             one row per image, sorted by image_id
       OUT/SPLIT/manifest.json                      written last: counts, skipped records, checksums

Row columns: image_id int64, file_name string, image binary (JPEG q95 or PNG, IMAGE_SIZE x IMAGE_SIZE,
shorter side resized then centre-cropped), width / height int32 (the upright source image),
captions list<string> (stripped, empty ones dropped), category_ids list<int64> (sorted, unique).

Bad records never crash the job and never vanish: each one is in the manifest's `skipped` list
with a reason (missing_file, unreadable, empty, truncated, not_an_image, corrupt, too_many_pixels,
unsupported_mode, no_captions, duplicate_image_id, bad_image_record) and the job exits 0. Input the
job cannot work from at all (an annotation file missing or not valid COCO JSON, no image folder)
is an error with exit code 2, raised before anything is written.

Crash safety: everything is written into a hidden OUT/.SPLIT.partial-<pid>/ folder (manifest last)
which is renamed to OUT/SPLIT only when complete, so a reader never sees a half-written split.
Re-running on the same input writes byte-identical shards (fixed shard boundaries, sorted rows,
deterministic encoders).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from jobs.coco_records import PrepareError, load_annotations, skip_record
from jobs.manifest import COMPRESSION, MANIFEST, SCHEMA, SCHEMA_VERSION
from model.transform import MAX_PIXELS, ImageDecodeError, open_image, resize_center_crop

SHARD_ROWS = 1024  # rows per Parquet file: many files -> file-level shuffling and parallel reads
ROW_GROUP_ROWS = 256  # rows per row group: the unit a streaming reader fetches
DECODE_BATCH = 32  # images per Ray Data map_batches call
JPEG_QUALITY = 95


# ---------------------------------------------------------------------------
# Image decoding: runs inside Ray Data tasks, one batch of files at a time


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    image_dir: str,
    image_size: int,
    max_pixels: int,
    draft: bool,
    image_format: str,
) -> dict[str, np.ndarray]:
    """Read, decode, resize and re-encode a batch of image files; failures become a `reason`, never an exception."""
    ids, names = batch["image_id"], batch["file_name"]
    n = len(ids)
    images = np.empty(n, dtype=object)
    widths, heights = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int32)
    reasons, details = np.full(n, "", dtype=object), np.full(n, "", dtype=object)
    for i, name in enumerate(names):
        images[i] = b""
        try:
            data = (Path(image_dir) / str(name)).read_bytes()
        except FileNotFoundError:
            reasons[i], details[i] = "missing_file", f"no file {name} in {image_dir}"
            continue
        except OSError as exc:
            reasons[i], details[i] = "unreadable", f"{type(exc).__name__}: {exc}"
            continue
        try:
            widths[i], heights[i] = upright_size(data)
            img = open_image(data, max_pixels=max_pixels, draft_size=image_size if draft else None)
            img = resize_center_crop(img, image_size)
        except ImageDecodeError as exc:
            reasons[i], details[i] = exc.reason, exc.detail
            continue
        images[i] = encode_image(img, image_format)
    return {"image_id": ids, "image": images, "width": widths, "height": heights, "reason": reasons, "detail": details}


def upright_size(data: bytes) -> tuple[int, int]:
    """(width, height) as displayed, from the header alone: EXIF orientations 5-8 swap the sides."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1)
    except Exception:
        return 0, 0  # open_image reports the real problem next
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def encode_image(img: Image.Image, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


# ---------------------------------------------------------------------------
# Output: fixed-size shards in a hidden folder, manifest last, then one rename


class ShardWriter:
    """Collects rows in id order and writes part-NNNNN.parquet every `shard_rows` rows."""

    def __init__(self, folder: Path, shard_rows: int, row_group_rows: int) -> None:
        self.folder, self.shard_rows, self.row_group_rows = folder, shard_rows, row_group_rows
        self.rows: list[dict] = []
        self.shards: list[dict] = []
        self.caption_counts: list[int] = []  # one entry per row written, for the manifest's totals
        self.last_id = -1

    def add(self, row: dict) -> None:
        if self.caption_counts and row["image_id"] <= self.last_id:
            raise RuntimeError(f"rows out of order: {row['image_id']} after {self.last_id}")  # never: preserve_order
        self.last_id = row["image_id"]
        self.rows.append(row)
        self.caption_counts.append(len(row["captions"]))
        if len(self.rows) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        name = f"part-{len(self.shards):05d}.parquet"
        table = pa.Table.from_pylist(self.rows, schema=SCHEMA)
        pq.write_table(table, self.folder / name, row_group_size=self.row_group_rows, compression=COMPRESSION)
        self.shards.append({"name": name, "rows": len(self.rows), "sha256": _sha256(self.folder / name)})
        self.rows = []


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def prepare(
    coco_root: str | Path,
    split: str,
    out: str | Path,
    *,
    image_size: int = 256,
    limit: int | None = None,
    max_pixels: int = MAX_PIXELS,
    draft: bool = True,
    image_format: str = "jpeg",
    shard_rows: int = SHARD_ROWS,
    row_group_rows: int = ROW_GROUP_ROWS,
    progress: bool = True,
) -> dict:
    """Prepare one split; returns the manifest. Raises PrepareError (nothing written) on unusable input."""
    import ray

    from jobs import console

    coco_root, out = Path(coco_root).resolve(), _local_out(out)
    image_dir = coco_root / split
    ann = load_annotations(coco_root, split, limit=limit)
    if not image_dir.is_dir():
        raise PrepareError(f"missing image folder {image_dir}")
    final = out / split
    if final.exists() and not (final / MANIFEST).is_file():
        raise PrepareError(f"{final} exists and is not a prepared split (no {MANIFEST}); refusing to replace it")
    if final == image_dir:
        raise PrepareError(f"--out would replace the image folder {image_dir}")

    from jobs.runtime import ensure_ray

    joined = ensure_ray()  # only now: a bad annotation file fails fast, before Ray starts
    if progress:
        print(f"prepare: {len(ann.records)} images to decode on {joined}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f".{split}.partial-*"):  # left by a killed run: never complete, never read
        shutil.rmtree(stale, ignore_errors=True)
    partial = out / f".{split}.partial-{os.getpid()}"
    partial.mkdir()
    try:
        writer = ShardWriter(partial, shard_rows, row_group_rows)
        skipped = list(ann.skipped)
        by_id = {r.image_id: r for r in ann.records}
        bar = console.progress(len(ann.records), f"prepare {split}", unit="img", enabled=progress)
        if ann.records:
            items = [{"image_id": r.image_id, "file_name": r.file_name} for r in ann.records]
            ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / (4 * DECODE_BATCH))))
            ds = ds.map_batches(
                decode_batch,
                fn_kwargs={
                    "image_dir": str(image_dir),
                    "image_size": image_size,
                    "max_pixels": max_pixels,
                    "draft": draft,
                    "image_format": image_format,
                },
                batch_size=DECODE_BATCH,
                batch_format="numpy",
            )
            # Output order must not depend on which task finishes first: rows arrive sorted by id.
            ds.context.execution_options.preserve_order = True
            ds.context.enable_progress_bars = False  # our own bar counts images, not blocks
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for i, image_id in enumerate(batch["image_id"].tolist()):
                    rec = by_id[image_id]
                    if batch["reason"][i]:
                        skipped.append(skip_record(image_id, rec.file_name, batch["reason"][i], batch["detail"][i]))
                        continue
                    writer.add(
                        {
                            "image_id": image_id,
                            "file_name": rec.file_name,
                            "image": batch["image"][i],
                            "width": int(batch["width"][i]),
                            "height": int(batch["height"][i]),
                            "captions": rec.captions,
                            "category_ids": rec.category_ids,
                        }
                    )
                bar.update(len(batch["image_id"]))
        writer.flush()
        bar.close()

        assert {s["name"] for s in writer.shards} == {p.name for p in partial.glob("*.parquet")}
        assert sum(s["rows"] for s in writer.shards) == len(writer.caption_counts), "row count mismatch"
        skipped.sort(key=lambda s: (s["image_id"] if s["image_id"] is not None else -1, s["file_name"], s["reason"]))
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "split": split,
            "images": len(writer.caption_counts),
            "captions": sum(writer.caption_counts),
            "captions_dropped": ann.captions_dropped,
            "orphan_captions": ann.orphan_captions,
            "max_captions_per_image": max(writer.caption_counts, default=0),
            "skipped": skipped,
            "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
            "image_size": image_size,
            "image_format": image_format,
            "jpeg_quality": JPEG_QUALITY if image_format == "jpeg" else None,
            "draft": draft,
            "max_pixels": max_pixels,
            "columns": {f.name: str(f.type) for f in SCHEMA},
            "shards": writer.shards,
            "annotations": ann.files,
            "categories": ann.categories,
            "source": {"coco_root": str(coco_root), "split": split, "limit": limit},
            "created_with": _versions(),
        }
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
        _swap_into_place(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return manifest


def _swap_into_place(partial: Path, final: Path) -> None:
    """Replace `final` by the complete `partial` folder with renames (atomic on one filesystem)."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _versions() -> dict[str, str]:
    import importlib.metadata as md
    import platform as stdlib_platform

    out = {"python": stdlib_platform.python_version(), "schema_version": str(SCHEMA_VERSION)}
    for dist in ("pyarrow", "pillow", "ray", "pycocotools", "numpy"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[dist] = md.version(dist)
    return out


# ---------------------------------------------------------------------------
# Command line


def _local_out(out: str | Path) -> Path:
    """The output folder as a local path (file:// URIs too). Object stores have no atomic rename, which the
    partial-folder swap relies on: prepare onto a local or mounted folder and copy the result up once."""
    from jobs.storage import resolve

    text = str(out)
    if "://" in text and not text.startswith("file://"):
        raise PrepareError(
            f"--out {text}: prepare writes a local or mounted folder; prepare there, then copy it to the bucket "
            "(e.g. `aws s3 sync OUT s3://bucket/prefix`); jobs.train, jobs.sweep and jobs.evaluate read the URI"
        )
    return Path(resolve(text).path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco-root", type=Path, required=True, help="folder with annotations/ and the image folders")
    parser.add_argument("--split", required=True, help="e.g. train2017; reads captions_SPLIT.json and SPLIT/")
    parser.add_argument(
        "--out", required=True, help="prepared root (a folder or file:// URI); the split goes to OUT/SPLIT/"
    )
    parser.add_argument("--image-size", type=int, default=256, help="stored side in pixels (training resizes further)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images by id")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="skip images above this many pixels")
    parser.add_argument("--image-format", choices=("jpeg", "png"), default="jpeg", help="jpeg = quality 95")
    parser.add_argument("--no-draft", dest="draft", action="store_false", help="full-size JPEG decode before resizing")
    parser.add_argument("--shard-rows", type=int, default=SHARD_ROWS)
    parser.add_argument("--row-group-rows", type=int, default=ROW_GROUP_ROWS)
    parser.add_argument("--verbose", action="store_true", help="show library and worker output here too")
    args = parser.parse_args(argv)
    if (
        args.image_size < 8
        or args.shard_rows < 1
        or args.row_group_rows < 1
        or (args.limit is not None and args.limit < 0)
    ):
        parser.error("need --image-size >= 8, --shard-rows >= 1, --row-group-rows >= 1 and --limit >= 0")
    from jobs import console

    console.setup_once("prepare", verbose=args.verbose)  # jobs.demo calls main() with its console set up

    try:
        manifest = prepare(
            args.coco_root,
            args.split,
            args.out,
            image_size=args.image_size,
            limit=args.limit,
            max_pixels=args.max_pixels,
            draft=args.draft,
            image_format=args.image_format,
            shard_rows=args.shard_rows,
            row_group_rows=args.row_group_rows,
        )
    except PrepareError as exc:
        print(f"prepare: error: {exc}", file=sys.stderr)
        return 2
    reasons = ", ".join(f"{k}={v}" for k, v in manifest["skipped_by_reason"].items()) or "none"
    print(
        f"prepare: {manifest['images']} images, {manifest['captions']} captions -> {args.out.rstrip('/')}/{args.split} "
        f"({len(manifest['shards'])} shards); skipped {len(manifest['skipped'])} ({reasons}); "
        f"{manifest['captions_dropped']} empty captions dropped"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
