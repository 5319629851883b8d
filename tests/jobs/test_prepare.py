"""prepare on real COCO files: rows equal what pycocotools reports, output is reproducible and crash-safe."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools.coco import COCO

import jobs.prepare as prep
from jobs.dataset import DataError, read_manifest, resolve_splits
from model.config import load_config
from model.transform import open_image, resize_center_crop

pytestmark = pytest.mark.ray
COCO_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "coco"
ANN = COCO_FIXTURE / "annotations"


def _rows(split_dir) -> list[dict]:
    manifest = read_manifest(split_dir)
    return [row for s in manifest["shards"] for row in pq.read_table(split_dir / s["name"]).to_pylist()]


def test_rows_equal_pycocotools(prepared_coco):
    split_dir = prepared_coco / "train2017"
    caps = COCO(str(ANN / "captions_train2017.json"))
    inst = COCO(str(ANN / "instances_train2017.json"))
    rows = _rows(split_dir)

    assert [r["image_id"] for r in rows] == sorted(caps.getImgIds())  # one row per image, sorted by id
    for row in rows:
        info = caps.loadImgs(row["image_id"])[0]
        assert row["file_name"] == info["file_name"]
        assert (row["width"], row["height"]) == (info["width"], info["height"])
        assert row["captions"] == [
            a["caption"].strip() for a in caps.loadAnns(caps.getAnnIds(imgIds=[row["image_id"]]))
        ]
        assert row["category_ids"] == sorted(
            {a["category_id"] for a in inst.loadAnns(inst.getAnnIds(imgIds=[row["image_id"]]))}
        )
        assert row["category_ids"]  # every fixture image has instances
        # The stored image is the shared transform of the original at 64x64 (JPEG q95 + draft: close, not exact).
        stored = Image.open(io.BytesIO(row["image"]))
        assert stored.format == "JPEG" and stored.size == (64, 64) and stored.mode == "RGB"
        original = resize_center_crop(open_image((COCO_FIXTURE / "train2017" / row["file_name"]).read_bytes()), 64)
        diff = np.abs(np.asarray(stored, dtype=np.float32) - np.asarray(original, dtype=np.float32)).mean()
        assert diff < 8.0, (row["file_name"], diff)

    manifest = read_manifest(split_dir)
    assert manifest["images"] == 8 and manifest["captions"] == 40 and manifest["skipped"] == []
    assert manifest["image_size"] == 64 and manifest["image_format"] == "jpeg" and manifest["schema_version"] == 1
    assert {c["id"]: c["name"] for c in manifest["categories"]} == {
        c["id"]: c["name"] for c in inst.loadCats(inst.getCatIds())
    }
    checksums = {a["file"]: a["sha256"] for a in manifest["annotations"]}
    assert checksums == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ANN.glob("*.json")}
    # Shards: fixed boundaries (3 rows each), row groups of 2, checksums match the files.
    assert [s["rows"] for s in manifest["shards"]] == [3, 3, 2]
    for shard in manifest["shards"]:
        path = split_dir / shard["name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        assert pq.ParquetFile(path).metadata.row_group(0).num_rows <= 2


def test_rerun_is_identical_and_limit(prepared_coco, tmp_path):
    out = tmp_path / "again"
    args = ["--coco-root", str(COCO_FIXTURE), "--split", "train2017", "--out", str(out), "--image-size", "64"]
    assert prep.main([*args, "--shard-rows", "3", "--row-group-rows", "2"]) == 0
    first, second = prepared_coco / "train2017", out / "train2017"
    assert _rows(first) == _rows(second)
    assert read_manifest(first) == read_manifest(second)  # same shard checksums, same everything

    # Re-running over an existing prepared split replaces it (same content), --limit keeps the lowest ids.
    assert prep.main([*args, "--limit", "3", "--image-format", "png", "--no-draft"]) == 0
    rows = _rows(second)
    assert [r["image_id"] for r in rows] == sorted(r["image_id"] for r in _rows(first))[:3]
    assert Image.open(io.BytesIO(rows[0]["image"])).format == "PNG"
    assert sorted(p.name for p in out.iterdir()) == ["train2017"]  # no temporary folders left


def test_interrupted_run_leaves_nothing_complete(ray_local, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def crash(partial, final):  # the process dies after the shards and manifest, before the rename
        assert (partial / "manifest.json").is_file() and list(partial.glob("part-*.parquet"))
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_swap_into_place", crash)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(COCO_FIXTURE, "train2017", out, image_size=32, progress=False)
    assert list(out.iterdir()) == []  # the partial folder is cleaned up on the way out
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(out / "train2017")

    # A hard kill cannot clean up: its hidden partial folder is never read and is removed by the next run.
    killed = out / ".train2017.partial-12345"
    killed.mkdir()
    (killed / "part-00000.parquet").write_bytes(b"half a shard")
    with pytest.raises(DataError, match="no split 'train2017'"):
        resolve_splits(out, load_config("debug", ["--data.train_split=train2017"]))
    monkeypatch.undo()
    prep.prepare(COCO_FIXTURE, "train2017", out, image_size=32, limit=2, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["train2017"]
    assert read_manifest(out / "train2017")["images"] == 2

    # A crash while re-preparing keeps the previous complete split readable.
    monkeypatch.setattr(prep, "_swap_into_place", crash)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(COCO_FIXTURE, "train2017", out, image_size=32, limit=4, progress=False)
    assert read_manifest(out / "train2017")["images"] == 2


def test_refuses_to_replace_a_folder_that_is_not_a_prepared_split(tmp_path):
    out = tmp_path / "out"
    (out / "train2017").mkdir(parents=True)
    (out / "train2017" / "precious.txt").write_text("keep me")
    code = prep.main(["--coco-root", str(COCO_FIXTURE), "--split", "train2017", "--out", str(out)])
    assert code == 2
    assert (out / "train2017" / "precious.txt").read_text() == "keep me"


def test_annotation_sections_survive_the_fixture_cut(tmp_path):
    # The fixture keeps COCO's info/licenses/categories, so prepare sees real-shaped files.
    data = json.loads((ANN / "instances_train2017.json").read_text())
    assert {"info", "licenses", "images", "annotations", "categories"} <= data.keys()
    assert len(data["categories"]) == 80 and len(data["images"]) == 8
    shutil.copytree(COCO_FIXTURE, tmp_path / "coco")
    (tmp_path / "coco" / "annotations" / "instances_train2017.json").unlink()  # instances are optional
    ann = prep.load_annotations(tmp_path / "coco", "train2017")
    assert len(ann.records) == 8 and all(r.category_ids == [] for r in ann.records) and ann.categories == []
