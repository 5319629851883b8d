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
MAX_DEFAULT_LINES = 80  # issue 15: `make demo` printed 4,523 lines; the table had to be found in them


def test_demo_runs_end_to_end_and_hands_over_to_serving(ray_local, tmp_path, monkeypatch, capfd, mlflow_store):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store(tmp_path / "out" / "mlflow.db"))
    assert demo.main(["--out", str(tmp_path / "out"), *REDUCED]) == 0
    # capfd, not capsys: library loggers and bars write to the process's file descriptors directly
    captured = capfd.readouterr()
    printed, everything = captured.out, captured.out + captured.err
    last = json.loads((tmp_path / "out" / "LAST_RUN.json").read_text())

    assert last["model_uri"] == "models:/vl-jepa-captioner@champion"
    assert Path(last["held_out_image"]).is_file() and last["held_out_image"].endswith(".png")
    # the handed-over figures are the evaluation's of the registered model (36 held-out images, 18 classes)
    report = json.loads((tmp_path / "out" / "eval_report.json").read_text())
    assert last["exact_match_pct"] == report["exact_match_pct"] and last["probe_accuracy"] == report["probe_accuracy"]
    assert not math.isnan(last["probe_accuracy"]) and report["probe_kind"] == "category"
    assert f"held-out exact greedy captions: {last['exact_match_pct']:.1f}%" in printed
    assert "held-out exact greedy captions:" in printed
    assert "mlflow ui --backend-store-uri sqlite:///" in printed
    assert report["num_images"] == 36

    # What a person sees by default: a short transcript with the result table in it, the rest in the log file.
    lines = everything.splitlines()
    assert len(lines) < MAX_DEFAULT_LINES, f"{len(lines)} lines of default output:\n{everything}"
    assert (tmp_path / "out" / "eval_report.md").read_text().strip() in printed  # the whole table, intact
    assert "\r" not in everything, "a progress bar redrew itself into captured output"
    for noise in ("Starting execution of Dataset", "PlacementGroupCleaner", "Warning", "INFO"):
        assert noise not in everything, f"library output {noise!r} on the console:\n{everything}"
    logs = list((tmp_path / "out" / "logs").glob("demo-*.log"))
    assert len(logs) == 1 and f"log: {logs[0]}" in printed
    assert "Starting execution of Dataset" in logs[0].read_text()  # Ray Data's own lines went to the file
    assert printed.count("   training: ") == 2  # one line per epoch (not a terminal: no live bar)
