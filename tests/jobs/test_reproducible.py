"""Same config and seed, same run, through the real path (jobs.train: Ray Train + Ray Data), on CPU:

- the `debug` preset's loss curve (one worker) matches the golden curve stored in tests/jobs/golden/debug_loss.json;
- a 2-worker run whose rank 0 is killed in epoch 2 and restarted from epoch 1's checkpoint reports the same
  metrics every epoch and ends with the same weights, EMA target included, as the 2-worker run never
  interrupted, bit for bit. Its epoch 1 is a fresh start, so the same comparison shows that two 2-worker runs
  repeat each other (both runs come from `two_worker_runs` in tests/jobs/conftest.py, shared with
  test_train.py, which checks the resume by run name of the same killed run).

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

from jobs import train
from model.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

GOLDEN = Path(__file__).parent / "golden" / "debug_loss.json"
REGEN_ENV = "VLJEPA_REGEN_GOLDEN"
EPOCHS = 3  # as in tests/jobs/conftest.py's TWO_WORKER_OVERRIDES
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


def _assert_same_weights(wa: dict[str, torch.Tensor], wb: dict[str, torch.Tensor]) -> None:
    assert wa.keys() == wb.keys() and any(k.startswith("objective.ema_encoder.") for k in wa)
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"tensors differ: {different[:5]}"


def test_debug_loss_curve_matches_the_golden_curve(ray_local, prepared_shapes, tmp_path):
    curve = _curve(_train(prepared_shapes, tmp_path, "golden"))
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


def _same_epochs(a, b, epochs: list[int]) -> None:
    ma, mb = ({m["epoch"]: m for m in r.history} for r in (a, b))
    for epoch in epochs:
        assert [ma[epoch][k] for k in CURVE_KEYS] == [mb[epoch][k] for k in CURVE_KEYS], epoch


def test_killed_and_restarted_run_ends_with_the_uninterrupted_weights(two_worker_runs):
    runs = two_worker_runs
    assert runs.hook_fired, "the test hook never fired"
    # The restarted group restored epoch 1 (not 0) and trained epochs 2 and 3 ...
    assert runs.killed.metrics["start_epoch"] == 2 and runs.killed.metrics["epoch"] == EPOCHS
    # ... reporting what the uninterrupted run reported, bit for bit, and ending with its weights and EMA target.
    _same_epochs(runs.killed, runs.uninterrupted, [2, 3])
    _assert_same_weights(runs.weights["killed"][EPOCHS], runs.weights["uninterrupted"][EPOCHS])


def test_two_workers_repeat_the_same_run_bit_for_bit(two_worker_runs):
    runs = two_worker_runs
    # Both 2-worker runs started fresh; epoch 1 ran before the kill. Every epoch's metrics and weights agree.
    assert _curve(runs.killed) == _curve(runs.uninterrupted)
    assert sorted(runs.weights["killed"]) == sorted(runs.weights["uninterrupted"]) == [1, 2, 3]
    for epoch in (1, 2, 3):
        _assert_same_weights(runs.weights["killed"][epoch], runs.weights["uninterrupted"][epoch])
