"""Session fixtures for the data tests (and the training/sweep/serve tests that reuse them).

`prepared_shapes`: a prepared root with splits "train" (10 per class = 180 images) and "val"
(2 per class = 36 images) of the Run-0 shapes set, stored at 32x32 PNG.
`prepared_coco`: the 8-image COCO fixture prepared as split "train2017" at 64x64 JPEG.
Both are built once per session on the shared `ray_local` instance.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.make_shapes import make_shapes
from jobs.prepare import prepare

COCO_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "coco"


@pytest.fixture(scope="session")
def shapes_coco(tmp_path_factory) -> Path:
    """The raw shapes set in COCO layout (train + val), 32x32."""
    root = tmp_path_factory.mktemp("shapes-coco")
    make_shapes(root, per_class=10, val_per_class=2, image_size=32, seed=0)
    return root


@pytest.fixture(scope="session")
def prepared_shapes(ray_local, shapes_coco, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes-prepared")
    for split in ("train", "val"):
        prepare(shapes_coco, split, out, image_size=32, image_format="png", shard_rows=64, progress=False)
    return out


@pytest.fixture(scope="session")
def prepared_coco(ray_local, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("coco-prepared")
    prepare(COCO_FIXTURE, "train2017", out, image_size=64, shard_rows=3, row_group_rows=2, progress=False)
    return out
