"""Same config and seed, same run, through the real path (jobs.train: Ray Train + Ray Data), on CPU:

- the `debug` preset's loss curve matches the golden curve stored in tests/jobs/golden/debug_loss.json;
- a run killed in epoch 2 and resumed by name ends with the weights of the run never interrupted, EMA target
  included (bit for bit);
- two runs with two workers give the same loss curve and weights, bit for bit.

Regenerate the golden curve on purpose, after a deliberate recipe change, with
`VLJEPA_REGEN_GOLDEN=1 pytest tests/jobs/test_reproducible.py -k golden`, and commit the file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jobs import train
from jobs.train_loop import KILL_EPOCH_ENV, KILL_MARKER_ENV, MODEL_FILE, STATE_FILE
from model.checkpoint import read_metadata
from model.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

GOLDEN = Path(__file__).parent / "golden" / "debug_loss.json"
REGEN_ENV = "VLJEPA_REGEN_GOLDEN"
EPOCHS = 3
# The debug preset on 48 shapes images (6 steps of 8 per epoch), with the JEPA term on so an EMA target exists.
GOLDEN_OVERRIDES = [
    f"--train.epochs={EPOCHS}",
    f"--train.keep_checkpoints={EPOCHS}",  # every epoch's metrics and weights stay readable
    "--data.num_samples=48",
    "--objective.jepa_weight=0.5",
    "--train.eval_samples=1",
    "--tracking.enabled=false",
]
CURVE_KEYS = ("train_loss", "train_ce", "train_jepa", "val_ce", "lr")


def _train(prepared: Path, storage: Path, name: str, *extra: str):
    cfg = load_config("debug", [*GOLDEN_OVERRIDES, *extra])
    return train.run_training(cfg, str(prepared), run_name=name, storage_path=str(storage))


def _curve(result) -> dict[str, list[float]]:
    history = sorted(result.history, key=lambda m: m["epoch"])
    assert [m["epoch"] for m in history] == list(range(1, EPOCHS + 1))
    return {key: [float(m[key]) for m in history] for key in CURVE_KEYS}


def _last_checkpoint(storage: Path, name: str) -> Path:
    folders = [p for p in (storage / name).glob("checkpoint_*") if (p / MODEL_FILE).is_file()]
    return max(folders, key=lambda p: int(read_metadata(p / MODEL_FILE)["epoch"]))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """The model's tensors and the objective's extra state (the EMA target encoder)."""
    state = torch.load(folder / STATE_FILE, weights_only=True)
    return {**load_file(folder / MODEL_FILE), **{f"objective.{k}": v for k, v in state["objective_extra"].items()}}


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and any(k.startswith("objective.ema_encoder.") for k in wa)
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"tensors differ: {different[:5]}"


@pytest.fixture(scope="module")
def uninterrupted(ray_local, prepared_shapes, tmp_path_factory):
    storage = tmp_path_factory.mktemp("golden-runs")
    result = _train(prepared_shapes, storage, "golden")
    return {"result": result, "storage": storage}


def test_debug_loss_curve_matches_the_golden_curve(uninterrupted):
    curve = _curve(uninterrupted["result"])
    if os.environ.get(REGEN_ENV) == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({"overrides": GOLDEN_OVERRIDES, "curve": curve}, indent=2) + "\n")
        pytest.skip(f"{REGEN_ENV}=1: wrote {GOLDEN}; commit it")
    golden = json.loads(GOLDEN.read_text())
    assert golden["overrides"] == GOLDEN_OVERRIDES
    how = (
        f"the debug preset's loss curve moved. If the recipe change is deliberate, regenerate the curve with "
        f"`{REGEN_ENV}=1 .venv/bin/python -m pytest tests/jobs/test_reproducible.py -k golden` and commit {GOLDEN.name}"
    )
    for key in CURVE_KEYS:
        # Tight, not bitwise: another CPU may pick other vector kernels; a recipe change moves far more.
        pairs = zip(curve[key], golden["curve"][key], strict=True)
        close = all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7) for a, b in pairs)
        assert close, f"{key}: got {curve[key]}, golden {golden['curve'][key]}: {how}"


def test_killed_and_resumed_run_ends_with_the_uninterrupted_weights(uninterrupted, prepared_shapes, tmp_path):
    storage, marker = tmp_path / "runs", tmp_path / "killed.marker"
    mp = pytest.MonkeyPatch()
    mp.setenv(KILL_EPOCH_ENV, "2")
    mp.setenv(KILL_MARKER_ENV, str(marker))
    try:
        with pytest.raises(Exception, match="(?i)fail|error|exit"):  # no restarts allowed: the run dies in epoch 2
            _train(prepared_shapes, storage, "resumed", "--train.max_failures=0")
    finally:
        mp.undo()
    assert marker.exists(), "the test hook never fired"
    resumed = _train(prepared_shapes, storage, "resumed")  # the same run name: restores epoch 1, trains 2 and 3
    assert resumed.metrics["start_epoch"] == 2 and resumed.metrics["epoch"] == EPOCHS
    # Epochs 2 and 3 after the resume report what the uninterrupted run reported, bit for bit.
    ran = {m["epoch"]: m for m in uninterrupted["result"].history}
    for m in resumed.history:
        if m["epoch"] >= 2:
            assert [m[k] for k in CURVE_KEYS] == [ran[m["epoch"]][k] for k in CURVE_KEYS], m["epoch"]
    _assert_same_weights(_last_checkpoint(uninterrupted["storage"], "golden"), _last_checkpoint(storage, "resumed"))


def test_two_workers_repeat_the_same_run_bit_for_bit(ray_local, prepared_shapes, tmp_path):
    runs = [_train(prepared_shapes, tmp_path, f"two-{i}", "--train.num_workers=2") for i in range(2)]
    assert _curve(runs[0]) == _curve(runs[1])
    _assert_same_weights(_last_checkpoint(tmp_path, "two-0"), _last_checkpoint(tmp_path, "two-1"))
