"""Session fixtures for the data tests (and the training/sweep/serve tests that reuse them).

`prepared_shapes`: a prepared root with splits "train" (10 per class = 180 images) and "val"
(2 per class = 36 images) of the Run-0 shapes set, stored at 32x32 PNG.
`prepared_coco`: the 8-image COCO fixture prepared as split "train2017" at 64x64 JPEG.
Both are built once per session on the shared `ray_local` instance.
`two_worker_runs`: three `jobs.train` fits on `prepared_shapes` shared by the training and reproducibility tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

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


# ---------------------------------------------------------------------------
# One 2-worker run and its interrupted twin, shared by test_reproducible.py and test_train.py. Each Ray Train
# fit costs ~20 s here whatever its size (worker group, data pipeline, per-epoch evaluation and checkpoint):
# the five fits these files made for themselves are three, and the interrupted run must now equal the
# uninterrupted one bit for bit, which also proves two 2-worker runs repeat each other.

# The debug preset on 49 shapes images (6 steps of 4 rows per worker per epoch), with the JEPA term on so an
# EMA target exists; every epoch's checkpoint kept, so every epoch's metrics stay readable. 49 rows, not 48:
# the equal split over 2 workers drops one, so the LR horizon must come from the steps the workers take (24
# rows each in batches of 4: 6), not from the global batch (ceil(49 / 8) = 7, where the cosine never reaches 0).
TWO_WORKER_OVERRIDES = [
    "--train.num_workers=2",
    "--train.batch_size=8",
    "--train.epochs=3",
    "--train.keep_checkpoints=3",
    "--data.num_samples=49",
    "--objective.jepa_weight=0.5",
    "--train.eval_samples=1",
]


@dataclass
class TwoWorkerRuns:
    uninterrupted: Any  # jobs.train.TrainResult of 3 epochs, never interrupted
    killed: Any  # the same config; rank 0 died after the first step of epoch 2, the group restarted from epoch 1
    hook_fired: bool  # the kill hook really killed rank 0
    extended: Any  # the killed run's name again with train.epochs=4: resumes after epoch 3, trains only epoch 4
    # {run name: {epoch: tensors}} of both 3-epoch runs, read before the extension pruned any checkpoint
    weights: dict[str, dict[int, dict[str, torch.Tensor]]]
    storage: Path
    tracking_uri: str


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's model tensors and the objective's extra state (the EMA target encoder)."""
    from safetensors.torch import load_file

    from jobs.train_loop import MODEL_FILE, STATE_FILE

    state = torch.load(folder / STATE_FILE, weights_only=True)
    return {**load_file(folder / MODEL_FILE), **{f"objective.{k}": v for k, v in state["objective_extra"].items()}}


def run_checkpoints(storage: Path, name: str) -> dict[int, dict[str, torch.Tensor]]:
    """{epoch: tensors} of every checkpoint folder a run keeps."""
    from jobs.train_loop import MODEL_FILE
    from model.checkpoint import read_metadata

    folders = [p for p in (storage / name).glob("checkpoint_*") if (p / MODEL_FILE).is_file()]
    return {int(read_metadata(p / MODEL_FILE)["epoch"]): checkpoint_tensors(p) for p in folders}


@pytest.fixture(scope="session")
def two_worker_runs(ray_local, prepared_shapes, tmp_path_factory, mlflow_store) -> TwoWorkerRuns:
    from jobs import train
    from jobs.train_loop import KILL_EPOCH_ENV, KILL_MARKER_ENV
    from model.config import load_config

    storage = tmp_path_factory.mktemp("two-worker-runs")
    tracking_uri = mlflow_store(storage / "mlflow.db")

    def fit(name: str, *extra: str) -> Any:
        cfg = load_config("debug", [*TWO_WORKER_OVERRIDES, f"--tracking.tracking_uri={tracking_uri}", *extra])
        return train.run_training(cfg, str(prepared_shapes), run_name=name, storage_path=str(storage))

    uninterrupted = fit("uninterrupted")
    marker = storage / "killed.marker"
    mp = pytest.MonkeyPatch()
    mp.setenv(KILL_EPOCH_ENV, "2")
    mp.setenv(KILL_MARKER_ENV, str(marker))
    try:
        killed = fit("killed")  # train.max_failures=2: Ray Train restarts the group from the last checkpoint
    finally:
        mp.undo()
    hook_fired = marker.exists()
    weights = {name: run_checkpoints(storage, name) for name in ("uninterrupted", "killed")}
    extended = fit("killed", "--train.epochs=4")
    return TwoWorkerRuns(uninterrupted, killed, hook_fired, extended, weights, storage, tracking_uri)
