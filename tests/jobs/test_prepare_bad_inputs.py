"""Every bad input from issue 3, built on the fly: skipped with its reason or converted, never a crash."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import jobs.prepare as prep
from jobs.dataset import read_manifest

COCO_JPEGS = Path(__file__).resolve().parents[1] / "fixtures" / "coco" / "train2017"
NON_ASCII = "Ein Bär läuft über die Straße — 日本語のキャプション 🐻"
LONG = "a very long caption " * 250  # 5000 characters: kept whole, truncation is training's job


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _exif_rotated_jpeg() -> bytes:
    """Stored 60x30, left half red / right half blue, EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    img = Image.new("RGB", (60, 30), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(img, "JPEG", quality=95, exif=exif.tobytes())


def _sixteen_bit_png() -> bytes:
    arr = np.full((40, 40), 65535, dtype=np.uint16)  # full-scale 16-bit white
    arr[20:] = 0
    return _encode(Image.fromarray(arr), "PNG")


def _bad_coco(root: Path) -> dict[str, str | None]:
    """Write a COCO root; returns file_name -> expected skip reason (None: a row must be written)."""
    good = (COCO_JPEGS / "000000183872.jpg").read_bytes()
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red -> white on composite
    files: dict[str, bytes | None] = {
        "good.jpg": good,
        "missing.jpg": None,
        "zero.jpg": b"",
        "truncated.jpg": good[: len(good) // 2],
        "text.jpg": b"this is a caption file, not a picture\n" * 20,
        "png_named.jpg": _encode(Image.new("RGB", (50, 40), (0, 200, 0)), "PNG"),
        "gray.jpg": _encode(Image.new("L", (40, 40), 128), "JPEG"),
        "cmyk.jpg": _encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG"),
        "rgba.png": _encode(rgba, "PNG"),
        "sixteen.png": _sixteen_bit_png(),
        "exif.jpg": _exif_rotated_jpeg(),
        "big.png": _encode(Image.new("RGB", (1200, 1000), (9, 9, 9)), "PNG"),  # 1.2 MP > --max-pixels 1 MP
        "nocaps.jpg": good,
        "blankcaps.jpg": good,
        "unicode.jpg": good,
        "long.jpg": good,
        "dup_second.jpg": good,
    }
    expected = {
        "good.jpg": None,
        "missing.jpg": "missing_file",
        "zero.jpg": "empty",
        "truncated.jpg": "truncated",
        "text.jpg": "not_an_image",
        "png_named.jpg": None,
        "gray.jpg": None,
        "cmyk.jpg": None,
        "rgba.png": None,
        "sixteen.png": None,
        "exif.jpg": None,
        "big.png": "too_many_pixels",
        "nocaps.jpg": "no_captions",
        "blankcaps.jpg": "no_captions",
        "unicode.jpg": None,
        "long.jpg": None,
        "dup_second.jpg": "duplicate_image_id",
        "": "bad_image_record",
    }
    (root / "split").mkdir(parents=True)
    (root / "annotations").mkdir()
    for name, data in files.items():
        if data is not None:
            (root / "split" / name).write_bytes(data)

    images, anns = [], []
    for image_id, name in enumerate(files, start=1):
        images.append({"id": image_id, "file_name": name, "width": 0, "height": 0})
        if name == "nocaps.jpg":
            continue
        texts = ["a test picture", "  another caption\n"]
        if name == "blankcaps.jpg":
            texts = ["", "   \t\n"]
        elif name == "unicode.jpg":
            texts = [NON_ASCII, "   "]
        elif name == "long.jpg":
            texts = [LONG]
        for text in texts:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "caption": text})
    dup_id = next(i["id"] for i in images if i["file_name"] == "good.jpg")
    next(i for i in images if i["file_name"] == "dup_second.jpg")["id"] = dup_id  # a second entry for good.jpg's id
    images.append({"id": 999, "width": 10})  # no file_name: a broken entry
    (root / "annotations" / "captions_split.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return expected


@pytest.mark.ray
def test_bad_records_are_skipped_with_reasons_or_converted(ray_local, tmp_path):
    root, out = tmp_path / "coco", tmp_path / "out"
    expected = _bad_coco(root)
    argv = [
        "--coco-root",
        str(root),
        "--split",
        "split",
        "--out",
        str(out),
        "--image-size",
        "32",
        "--max-pixels",
        "1000000",
    ]
    assert prep.main(argv) == 0

    manifest = read_manifest(out / "split")
    reasons = {s["file_name"]: s["reason"] for s in manifest["skipped"]}
    assert reasons == {name: reason for name, reason in expected.items() if reason}
    assert all(s["detail"] for s in manifest["skipped"])  # every skip says why in words too
    assert manifest["skipped_by_reason"]["duplicate_image_id"] == 1

    rows = {r["file_name"]: r for s in manifest["shards"] for r in pq.read_table(out / "split" / s["name"]).to_pylist()}
    assert set(rows) == {name for name, reason in expected.items() if reason is None}
    assert manifest["images"] == len(rows)
    # Dropped: "" and a tab/newline one (blankcaps), "   " (unicode); orphan captions are not counted.
    assert manifest["captions_dropped"] == 3
    assert manifest["orphan_captions"] == 2  # dup_second.jpg's own captions point at its original id
    assert manifest["captions"] == sum(len(r["captions"]) for r in rows.values())

    pixels = {name: np.asarray(Image.open(io.BytesIO(r["image"]))) for name, r in rows.items()}
    assert all(p.shape == (32, 32, 3) for p in pixels.values())  # every mode became 32x32 RGB
    assert pixels["png_named.jpg"][16, 16, 1] > 150  # the green PNG, not skipped
    assert abs(int(pixels["gray.jpg"][16, 16, 0]) - 128) < 6
    assert pixels["rgba.png"].min() > 240  # transparent -> white background
    assert pixels["sixteen.png"][4, 16].min() > 240 and pixels["sixteen.png"][28, 16].max() < 15  # scaled, not clipped
    cmyk = pixels["cmyk.jpg"][16, 16]
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60  # C=0 M=255 Y=255 K=0 is red
    # EXIF applied: the displayed image is 30x60 with red on top, blue at the bottom.
    exif = pixels["exif.jpg"]
    assert (rows["exif.jpg"]["width"], rows["exif.jpg"]["height"]) == (30, 60)
    assert exif[4, 16, 0] > 200 and exif[4, 16, 2] < 60 and exif[28, 16, 2] > 200 and exif[28, 16, 0] < 60

    assert rows["good.jpg"]["captions"] == ["a test picture", "another caption"]  # stripped
    assert rows["unicode.jpg"]["captions"] == [NON_ASCII]
    assert rows["long.jpg"]["captions"] == [LONG.strip()]
    assert rows["good.jpg"]["image_id"] == 1 and rows["good.jpg"]["category_ids"] == []


@pytest.mark.parametrize(
    "problem",
    ["missing_captions", "malformed_json", "not_an_object", "no_images_list", "malformed_instances", "no_image_folder"],
)
def test_unusable_annotations_exit_2_and_write_nothing(tmp_path, capsys, problem):
    root, out = tmp_path / "coco", tmp_path / "out"
    (root / "annotations").mkdir(parents=True)
    (root / "split").mkdir()
    captions = root / "annotations" / "captions_split.json"
    captions.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}))
    if problem == "missing_captions":
        captions.unlink()
    elif problem == "malformed_json":
        captions.write_text('{"images": [{"id": 1, "file_name": "a.jpg"}, ')
    elif problem == "not_an_object":
        captions.write_text("[1, 2, 3]")
    elif problem == "no_images_list":
        captions.write_text(json.dumps({"annotations": []}))
    elif problem == "malformed_instances":
        (root / "annotations" / "instances_split.json").write_text("{oops")
    elif problem == "no_image_folder":
        (root / "split").rmdir()

    assert prep.main(["--coco-root", str(root), "--split", "split", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "prepare: error:" in err and ("annotation" in err or "image folder" in err)
    assert not out.exists()  # nothing half-written
