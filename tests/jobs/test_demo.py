"""The demo end to end on a reduced budget, through the real path: make_shapes -> prepare -> Ray Train
(2 CPU workers) -> MLflow registry -> jobs.evaluate by models:/ URI -> LAST_RUN.json for serve.demo.

The demo's figures are not asserted at this 2-epoch budget (tests/jobs/test_run0.py checks that the recipe
reaches Run 0's 100% / 100% on a reduced budget); the demo prints the real figures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from jobs import demo

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REDUCED = ["--per-class", "8", "--val-per-class", "2", "--epochs", "2"]


def test_demo_runs_end_to_end_and_hands_over_to_serving(ray_local, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    assert demo.main(["--out", str(tmp_path / "out"), *REDUCED]) == 0
    printed = capsys.readouterr().out
    last = json.loads((tmp_path / "out" / "LAST_RUN.json").read_text())

    assert last["model_uri"] == "models:/vl-jepa-captioner@champion"
    assert Path(last["held_out_image"]).is_file() and last["held_out_image"].endswith(".png")
    # real figures from the evaluation of the registered model: 36 held-out images, 18 classes
    assert 0.0 <= last["exact_match_pct"] <= 100.0
    assert 0.0 <= last["probe_accuracy"] <= 1.0 and not math.isnan(last["probe_accuracy"])
    assert "held-out exact greedy captions:" in printed
    assert "mlflow ui --backend-store-uri sqlite:///" in printed
    report = json.loads((tmp_path / "out" / "eval_report.json").read_text())
    assert report["num_images"] == 36
