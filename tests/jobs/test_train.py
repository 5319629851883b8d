"""Training on a real local Ray: 2 CPU workers (DDP), a worker killed mid-epoch, resume by run name,
the MLflow run and registered model, and the checks that must fail before Ray is asked for anything."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from jobs import train
from jobs.train_loop import MODEL_FILE, STATE_FILE
from model.checkpoint import read_config, read_metadata
from model.config import load_config

pytestmark = pytest.mark.ray

# The runs: `two_worker_runs` in tests/jobs/conftest.py (the debug model on 49 shapes images, an uneven split:
# 6 steps of 4 rows per worker per epoch, 2 workers, 3 epochs; the same fits serve test_reproducible.py).


@pytest.fixture(scope="module")
def mlflow_uri(two_worker_runs) -> str:
    """The runs' MLflow store, also as $MLFLOW_TRACKING_URI (how `models:/` URIs resolve in jobs.evaluate)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", two_worker_runs.tracking_uri)
    yield two_worker_runs.tracking_uri
    mp.undo()


def test_worker_killed_mid_epoch_recovers_from_last_checkpoint(two_worker_runs):
    killed = two_worker_runs.killed
    assert two_worker_runs.hook_fired, "the test hook never fired"
    # The restarted group restored epoch 1 and trained epochs 2 and 3 again: no restart from 0.
    assert killed.metrics["epoch"] == 3
    assert killed.metrics["start_epoch"] == 2
    # The restored schedule went on from step 6 (not 0): 6 steps per worker per epoch, the cosine at 0 at the end.
    assert killed.metrics["steps"] == 6 and killed.metrics["lr"] == 0.0


def test_lr_horizon_is_the_steps_the_workers_take_on_an_uneven_split(two_worker_runs):
    # 49 rows over 2 workers: 24 each in batches of 4, 6 steps an epoch. A horizon from the global batch
    # (ceil(49 / 8) = 7 steps an epoch) leaves the cosine above 0 at the end of epoch 3.
    history = sorted(two_worker_runs.uninterrupted.history, key=lambda m: m["epoch"])
    assert [m["steps"] for m in history] == [6, 6, 6]
    assert history[0]["lr"] > 0 and history[-1]["lr"] == 0.0


def test_same_run_name_resumes_instead_of_restarting(two_worker_runs):
    extended = two_worker_runs.extended
    assert extended.metrics["epoch"] == 4
    assert extended.metrics["start_epoch"] == 4  # only epoch 4 ran
    assert extended.metrics["lr"] == 0.0  # the schedule of the new 4-epoch config, restored at step 18 of 24
    assert extended.mlflow_run_id == two_worker_runs.killed.mlflow_run_id  # one MLflow run for the whole run
    # The best-N policy (keep_checkpoints=3) dropped one of the 4 epochs' folders; the kept ones are complete.
    folders = sorted(p for p in (two_worker_runs.storage / "killed").glob("checkpoint_*") if p.is_dir())
    assert len(folders) == 3, folders
    for folder in folders:
        assert (folder / MODEL_FILE).is_file() and (folder / STATE_FILE).is_file()
    state = torch.load(Path(extended.checkpoint_dir) / STATE_FILE, weights_only=True)
    assert state["epoch"] in (2, 3, 4) and "optimizer" in state and "rng" in state
    assert read_config(Path(extended.checkpoint_dir) / MODEL_FILE).train.epochs == 4


def test_mlflow_run_holds_params_metrics_artifacts_and_a_registered_version(two_worker_runs, mlflow_uri):
    result = two_worker_runs.extended
    client = MlflowClient(mlflow_uri, registry_uri=mlflow_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2" and run.data.params["preset"] == "debug"
    assert run.data.tags["resume.changed.train.epochs"] == "3 -> 4"
    steps = sorted({m.step for m in client.get_metric_history(result.mlflow_run_id, "val_ce")})
    assert steps == [1, 2, 3, 4]
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"checkpoint", "config.json", "sample_captions.json", "final_metrics.json"} <= artifacts
    assert result.model_uri and result.model_uri.startswith("models:/vl-jepa-captioner/")
    version = client.get_model_version_by_alias("vl-jepa-captioner", "champion")
    assert f"models:/vl-jepa-captioner/{version.version}" == result.model_uri


def test_evaluate_loads_the_registered_model_by_uri(two_worker_runs, mlflow_uri, prepared_shapes):
    from jobs.evaluate import evaluate_model

    result = two_worker_runs.extended
    report = evaluate_model(result.alias_uri, str(prepared_shapes), split="val", max_images=8)
    assert report["preset"] == "debug" and report["num_images"] == 8
    # the registered version is the run's best checkpoint, weights and all
    assert report["fingerprint"] == read_metadata(Path(result.checkpoint_dir) / MODEL_FILE)["fingerprint"]
    assert f"| {report['exact_match_pct']:.2f}% |" in report["markdown"]


# ---------------------------------------------------------------------------
# Fail fast, before Ray is waited on


def _main(capsys, *args: str) -> tuple[int, str, float]:
    started = time.perf_counter()
    code = train.main(list(args))
    return code, capsys.readouterr().err, time.perf_counter() - started


# Bad inputs (missing folder or manifest, unknown key or preset, vision weights, batch split, categories the
# head cannot hold) are checked in a fresh process in tests/jobs/test_train_recipe.py, which also shows Ray
# never started. The cluster checks below need Ray: they fail before any worker is requested.


def test_gpus_the_cluster_lacks_fail_instead_of_waiting(ray_local, prepared_shapes, capsys, monkeypatch):
    monkeypatch.delenv(train.AUTOSCALING_ENV, raising=False)
    code, err, _ = _main(capsys, "--preset", "debug", "--data", str(prepared_shapes), "--train.use_gpu=true")
    assert code == 2 and "needs 1 GPU(s)" in err and "has 0" in err


def test_cluster_check_counts_cpus_for_workers_and_data(monkeypatch):
    monkeypatch.delenv(train.AUTOSCALING_ENV, raising=False)
    cfg = load_config("debug", ["--train.num_workers=4", "--train.cpus_per_worker=1"])
    with pytest.raises(train.PreflightError, match="needs 4 CPUs, but the Ray cluster has 2"):
        train.check_cluster(cfg, {"CPU": 2.0})
    with pytest.raises(train.PreflightError, match="Ray Data"):
        train.check_cluster(cfg, {"CPU": 4.0})
    train.check_cluster(cfg, {"CPU": 5.0})
    gpu = load_config("debug", ["--train.use_gpu=true", "--train.num_workers=2"])
    with pytest.raises(train.PreflightError, match="needs 2 GPU"):
        train.check_cluster(gpu, {"CPU": 8.0, "GPU": 1.0})
    train.check_cluster(gpu, {"CPU": 8.0, "GPU": 2.0})
    monkeypatch.setenv(train.AUTOSCALING_ENV, "1")  # an autoscaler may add GPU nodes: let Ray wait for them
    train.check_cluster(gpu, {"CPU": 8.0})


def test_warmup_then_cosine_schedule():
    from jobs.optim import warmup_cosine

    f = warmup_cosine(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))
