"""Ray Tune sweeps on the real local Ray: real trials, ASHA stopping, a killed driver resuming.

Every trial is a real TorchTrainer run (debug model, 1 worker) on the prepared shapes fixture,
followed by the real evaluation; MLflow is a real sqlite store per test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import sweep_report
from jobs.sweep import main, plan_resources
from jobs.sweep_spaces import Space, expand, resolve

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.ray

# Small and fast: 36 training images, 2 CPUs a trial (0.5 Tune function + 1 worker + 0.5 data).
TINY = {"data.num_samples": 36, "train.batch_size": 8, "train.eval_samples": 1, "train.keep_checkpoints": 1}
SHARE = ["--trial-cpus=0.5", "--data-cpus=0.5", "--eval-max-images=18"]


def _space_file(tmp_path: Path, grid: dict, epochs: int) -> str:
    path = tmp_path / "space.json"
    spec = {"base_preset": "debug", "overrides": {**TINY, "train.epochs": epochs}, "grid": grid}
    path.write_text(json.dumps(spec))
    return str(path)


def _tracking(store: str) -> list[str]:
    return [f"--tracking.tracking_uri={store}", "--tracking.registered_model=sweep-test"]


def _records_a_finished_trial(experiment: Path) -> bool:
    """Whether Tune's experiment state on storage lists a TERMINATED trial (a file being replaced reads as no)."""
    for state in experiment.glob("experiment_state-*.json"):
        try:
            if "TERMINATED" in state.read_text():
                return True
        except OSError:
            pass
    return False


def _rows(storage: Path, name: str) -> list[dict]:
    return json.loads((storage / name / "report" / "rows.json").read_text())


def test_concurrency_leaves_room_for_workers_and_data():
    space = Space(name="c", base_preset="debug", grid={"model.num_latent_vectors": [2, 4, 8, 16]})
    trials, _, _ = resolve(space, expand(space))
    # 1 (Tune function) + 1 (worker) + 1 (data) = 3 CPUs a trial: 4 CPUs hold one, not four.
    assert plan_resources(trials, {"CPU": 4.0}).concurrency == 1
    assert plan_resources(trials, {"CPU": 4.0}, driver_cpus=0.5, data_cpus=0.5).concurrency == 2
    assert plan_resources(trials, {"CPU": 64.0}, max_concurrent=3).concurrency == 3
    assert plan_resources(trials, {"CPU": 64.0}).concurrency == 4  # never more than the trials
    gpu_trials, _, _ = resolve(space, expand(space), {"train.use_gpu": True, "train.num_workers": 2})
    # GPUs bind first: 8 GPUs / 2 per trial.
    assert plan_resources(gpu_trials, {"CPU": 96.0, "GPU": 8.0}).concurrency == 4
    starved = plan_resources(trials, {"CPU": 2.0})
    assert starved.concurrency == 1 and "cannot hold one trial" in starved.why


def test_report_table_best_row_and_plot(tmp_path):
    rows = [
        {"trial": "a", "model.num_latent_vectors": 4, "conditioning": "cross_attn", "K": 4, "bottleneck": "plan"},
        {"trial": "b", "model.num_latent_vectors": 16, "conditioning": "cross_attn", "K": 16, "bottleneck": "plan"},
        {"trial": "c", "model.num_latent_vectors": 16, "conditioning": "gated", "K": 16, "bottleneck": "plan"},
        {"trial": "d", "model.num_latent_vectors": 4, "conditioning": "gated", "K": 4, "bottleneck": "none"},
    ]
    for row, ce, cider in zip(rows, (2.0, 1.5, float("nan"), 1.0), (0.1, 0.3, 0.9, 0.2), strict=True):
        row.update(val_ce=ce, cider_d=cider, status="completed")
    rows[3]["status"] = "stopped at 1/3"
    assert sweep_report.best_row(rows, "val_ce", "min")["trial"] == "b"  # NaN and unfinished never win
    assert sweep_report.best_row(rows, "cider_d", "max")["trial"] == "c"
    assert sweep_report.default_mode("cider_d") == "max" and sweep_report.default_mode("val_ce") == "min"
    cols = sweep_report.columns(rows, ["model.num_latent_vectors"])
    assert cols[:3] == ["trial", "model.num_latent_vectors", "conditioning"] and "K" not in cols
    md = sweep_report.markdown(rows, cols, title="t", metric="val_ce", mode="min", best=rows[1])
    assert "| **best** b | 16 | cross_attn |" in md and "| - |" in md  # NaN shown as "-"
    png = tmp_path / "plot.png"
    assert sweep_report.plot(png, rows, metric="val_ce", title="t")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size < 200_000
    assert not sweep_report.plot(tmp_path / "none.png", rows, metric="probe_accuracy", title="t")


def test_invalid_point_exits_2_naming_values_before_launch(tmp_path, capsys):
    space = _space_file(tmp_path, {"model.embed_dim": [32, 33]}, epochs=1)
    rc = main(["--space", space, "--data", str(tmp_path / "nowhere"), "--storage", str(tmp_path / "runs")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "model.embed_dim=33 is not divisible by model.num_heads=2" in err
    assert not (tmp_path / "runs").exists()  # nothing launched, nothing written


@pytest.mark.slow
def test_killed_sweep_resumes_to_a_table_of_real_metrics(ray_local, prepared_shapes, tmp_path, capsys, mlflow_store):
    """Two 1-epoch trials, one at a time; the driver is killed once the first has finished, and the same command
    run again finishes the sweep without redoing it: a table of real metrics, MLflow runs and one registration."""
    from mlflow import MlflowClient

    storage = tmp_path / "runs"
    space = _space_file(tmp_path, {"model.num_latent_vectors": [2, 8]}, epochs=1)
    args = ["--space", space, "--data", str(prepared_shapes), "--storage", str(storage), "--name", "resume"]
    args += ["--max-concurrent=1", "--scheduler=fifo", *SHARE, *_tracking(mlflow_store(tmp_path / "mlflow.db"))]
    # The first driver joins the session's Ray like `ray job submit` would; killing it ends its trials.
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "jobs.sweep", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    finished = None
    seen = []
    for line in first.stdout:
        seen.append(line)
        if " finished: " in line and line.startswith("sweep: trial "):
            finished = line.split()[2]
            break
    assert finished, "".join(seen[-30:])
    # Kill only once Tune's experiment state on storage records the finished trial.
    deadline = time.monotonic() + 120
    while not _records_a_finished_trial(storage / "resume"):
        if time.monotonic() > deadline:
            first.kill()
            pytest.fail("Tune's experiment state never recorded the finished trial within 120 s")
        time.sleep(0.2)
    first.kill()
    first.wait()

    # The same command again, here (the session's Ray is this process's): it resumes.
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "resuming" in out
    assert f"trial {finished} started" not in out  # the finished trial is not redone
    rows = _rows(storage, "resume")
    assert len(rows) == 2 and {r["K"] for r in rows} == {2, 8} and finished in {r["trial"] for r in rows}
    for row in rows:
        assert row["status"] == "completed"
        for key in ("val_ce", "final_ce", "greedy_unique_pct", "cider_d", "probe_accuracy"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (key, row)
    assert rows[0]["val_ce"] != rows[1]["val_ce"]
    assert sorted(r["plan_bytes"] for r in rows) == [2 * 32 * 2, 8 * 32 * 2]

    report = storage / "resume" / "report"
    table = (report / "results.md").read_text()
    assert "**best**" in table and table.count("| completed |") == 2
    assert (report / "results.csv").read_text().count("\n") == 3
    assert (report / "plot.png").read_bytes()[:4] == b"\x89PNG"

    # MLflow: one parent (the first driver's, kept on resume), each row's trial run nested under it and
    # finished, exactly one registered version (the best trial's). The killed driver's second trial may have
    # opened a run before its first checkpoint; that run never finishes, and no row names it.
    meta = json.loads((storage / "resume" / "sweep.json").read_text())
    client = MlflowClient(meta["tracking_uri"])
    children = client.search_runs(
        [client.get_run(meta["parent_run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{meta['parent_run_id']}'",
    )
    finished_runs = {c.info.run_id for c in children if c.info.status == "FINISHED"}
    assert finished_runs == {r["mlflow_run_id"] for r in rows}
    versions = client.search_model_versions("name = 'sweep-test'")
    best = [r for r in rows if r.get("registered_model")]
    assert len(versions) == 1 and len(best) == 1
    assert versions[0].run_id == best[0]["mlflow_run_id"]
    parent_files = {f.path for f in client.list_artifacts(meta["parent_run_id"], "report")}
    assert {"report/results.md", "report/results.csv", "report/plot.png"} <= parent_files


def test_placement_groups_of_dead_creators_are_released_and_no_other(ray_local):
    # What an ASHA-stopped trial leaves (ray-project/ray#54305): its Train controller (an actor) made a group,
    # then died with the trial; the group belongs to the job and kept its CPUs until the driver exited.
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

    from jobs.sweep import orphaned_groups, release_orphaned_groups

    @ray.remote(num_cpus=0)
    class Controller:
        def reserve(self) -> bytes:
            pg = placement_group([{"CPU": 1}])
            ray.get(pg.ready())
            return pg.id.binary()

    dead, alive = Controller.remote(), Controller.remote()
    dead_pg, alive_pg = ray.get(dead.reserve.remote()), ray.get(alive.reserve.remote())
    own = placement_group([{"CPU": 1}])  # the driver's own (how Tune reserves a trial): never touched
    ray.get(own.ready())
    ray.kill(dead)
    deadline = time.monotonic() + 30
    while dead_pg not in orphaned_groups() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert orphaned_groups() == [dead_pg]
    assert release_orphaned_groups() == 1
    table = ray.util.placement_group_table()
    assert table[dead_pg.hex()]["state"] == "REMOVED"
    assert table[alive_pg.hex()]["state"] == "CREATED" and table[own.id.hex()]["state"] == "CREATED"
    assert orphaned_groups() == []
    remove_placement_group(own)
    remove_placement_group(PlacementGroup(ray.PlacementGroupID(alive_pg)))
    ray.kill(alive)
