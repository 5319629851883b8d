"""The Run-0 synthetic set: COCO layout readable by pycocotools, classes recoverable, deterministic."""

from __future__ import annotations

import hashlib
import re

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from jobs.make_shapes import CLASSES, COLOURS, SHAPES, main, make_shapes


def _tree_digest(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_classes_and_captions(tmp_path):
    assert main(["--out", str(tmp_path), "--per-class", "3", "--val-per-class", "1", "--image-size", "24"]) == 0
    for split, per_class in (("train", 3), ("val", 1)):
        caps = COCO(str(tmp_path / "annotations" / f"captions_{split}.json"))
        inst = COCO(str(tmp_path / "annotations" / f"instances_{split}.json"))
        assert len(inst.getCatIds()) == 18 == len(COLOURS) * len(SHAPES)
        assert sorted(caps.getImgIds()) == sorted(inst.getImgIds())
        per_cat = {c: len(inst.getImgIds(catIds=[c])) for c in inst.getCatIds()}
        assert set(per_cat.values()) == {per_class}
        for image_id in caps.getImgIds():
            info = caps.loadImgs(image_id)[0]
            img = Image.open(tmp_path / split / info["file_name"])
            assert img.size == (24, 24) and img.mode == "RGB"
            (ann,) = inst.loadAnns(inst.getAnnIds(imgIds=[image_id]))
            name = inst.loadCats(ann["category_id"])[0]["name"]  # e.g. "red circle"
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and x + w <= 24.01 and y + h <= 24.01 and w > 0 and h > 0
            texts = [a["caption"] for a in caps.loadAnns(caps.getAnnIds(imgIds=[image_id]))]
            assert len(texts) == 5 and texts[0] in (f"a {name}", f"an {name}")
            for text in texts:  # every phrasing names exactly the right class
                found = [(c, s) for c, s in CLASSES if re.search(rf"\b{c} {s}\b", text)]
                assert found == [tuple(name.split())], text
            # the shape colour is really in the picture: the pixel nearest the class colour is close to it
            pixels = np.asarray(img, dtype=np.int32).reshape(-1, 3)
            target = np.array(COLOURS[name.split()[0]])
            assert np.abs(pixels - target).sum(1).min() < 60
    train_ids = set(COCO(str(tmp_path / "annotations" / "captions_train.json")).getImgIds())
    val_ids = set(COCO(str(tmp_path / "annotations" / "captions_val.json")).getImgIds())
    assert not train_ids & val_ids


def test_deterministic_and_no_identical_images(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_shapes(a, per_class=4, val_per_class=1, image_size=16, seed=7)
    make_shapes(b, per_class=4, val_per_class=1, image_size=16, seed=7)
    make_shapes(c, per_class=4, val_per_class=1, image_size=16, seed=8)
    assert _tree_digest(a) == _tree_digest(b)
    assert _tree_digest(a) != _tree_digest(c)
    pixels = [np.asarray(Image.open(p)).tobytes() for p in sorted(a.glob("*/*.png"))]
    assert len(pixels) == 18 * 5 and len(set(pixels)) == len(pixels)


def test_no_val_split(tmp_path):
    summary = make_shapes(tmp_path, per_class=1, val_per_class=0, image_size=16)
    assert summary == {"train": 18, "val": 0, "classes": 18}
    assert not (tmp_path / "annotations" / "captions_val.json").exists()
