"""Ray Tune sweeps over the bottleneck: every trial is a full training job on its own worker group.

    python -m jobs.sweep --space bottleneck --data data/shapes-prepared --quick
    python -m jobs.sweep --space my_space.json --data s3://bucket/coco-prepared --name k-sweep --storage s3://bucket/runs

How it runs (the Train V2 way):

    driver (this process) ── Tuner(run_trial) ── one Tune function per trial (1 CPU, does little)
                                                   └─ TorchTrainer.fit()  -> its own placement group of workers
                                                        every epoch: ray.train.report -> TuneReportCallback -> Tune
                                                   └─ evaluate the best checkpoint -> the trial's final row

ASHA (time attribute: the epoch) stops losing trials early. Trials run at most
`floor(cluster CPUs / CPUs one trial needs)` at a time, counting the Tune function, the worker
group and a Ray Data budget, so no trial's workers wait forever behind other trials' drivers.
Every trial is an MLflow run nested under the sweep's parent run; re-running the same `--name`
continues a sweep whose driver died. Results land in STORAGE/NAME/report/.

Stopped trials give their resources back: when ASHA stops a trial, Tune kills its function actor and the
Train controller it owns dies with it, but the controller's worker placement group belongs to the job and
outlives it (ray-project/ray#54305). Ray's own PlacementGroupCleaner asks the dashboard's State API, so on a
cluster without a dashboard (jobs.runtime starts local ones that way) the group kept its CPUs until the
driver exited, and on exact resources the next trial waited for them forever. The driver therefore removes,
while the sweep runs and once more at the end, every placement group of its job whose creating actor is dead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.tune
from ray.tune import Callback

from jobs import sweep_report
from jobs.sweep_spaces import Space, TrialPoint, build_config, describe, expand, load_space, resolve
from model.config import ConfigError, parse_overrides

EXIT_INVALID = 2
PER_EPOCH_METRICS = ("val_ce", "greedy_unique_pct", "exact_match_pct", "train_loss", "train_ce")
TRIAL_LINKS = ("checkpoint", "mlflow_run_id", "tracking_uri")  # where a trial's model and run are
META_FILE = "sweep.json"  # the sweep's identity on storage: its points and its MLflow parent run


@dataclass
class Resources:
    """What one trial holds while it runs, and how many trials fit at once."""

    driver_cpus: float  # the Tune function: builds the trainer, waits on it, evaluates at the end
    worker_cpus: float  # num_workers * cpus_per_worker
    worker_gpus: float  # num_workers when use_gpu
    data_cpus: float  # Ray Data budget for the trial's input pipeline
    concurrency: int = 1
    why: str = ""

    @property
    def per_trial_cpus(self) -> float:
        return self.driver_cpus + self.worker_cpus + self.data_cpus


def plan_resources(
    trials: Sequence[TrialPoint],
    cluster: dict[str, float],
    *,
    driver_cpus: float = 1.0,
    data_cpus: float = 1.0,
    max_concurrent: int | None = None,
) -> Resources:
    """Trials that fit side by side with room for each one's workers and data tasks (never below 1)."""
    workers = max(t.config.train.num_workers * t.config.train.cpus_per_worker for t in trials)
    gpus = max(t.config.train.num_workers if t.config.train.use_gpu else 0 for t in trials)
    res = Resources(driver_cpus, workers, float(gpus), data_cpus)
    cpu_total, gpu_total = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    limits = {"CPU": math.floor(cpu_total / res.per_trial_cpus + 1e-9)}
    if gpus:
        limits["GPU"] = math.floor(gpu_total / gpus + 1e-9)
    fit = min(limits.values())
    res.concurrency = max(1, fit)
    parts = [
        f"{k}: {cluster.get(k, 0.0):g} / {v:g} per trial" for k, v in (("CPU", res.per_trial_cpus), ("GPU", gpus)) if v
    ]
    res.why = f"{', '.join(parts)} -> {fit} at once"
    if fit < 1:
        res.why += " (the cluster cannot hold one trial now: on an autoscaling cluster nodes get added, else it waits)"
    if max_concurrent is not None and max_concurrent < res.concurrency:
        res.concurrency = max(1, max_concurrent)
        res.why += f", capped by --max-concurrent={max_concurrent}"
    if len(trials) < res.concurrency:
        res.concurrency = len(trials)
        res.why += f", {len(trials)} trial(s)"
    return res


# ---------------------------------------------------------------------------
# One trial (runs inside a Tune function actor)


@dataclass
class SweepContext:
    """Everything a trial needs besides its own point; shipped once through the object store."""

    name: str
    space: Space
    base_overrides: dict[str, Any]
    data_dir: str
    train_storage: str
    parent_run_id: str | None
    data_cpus: float
    eval_max_images: int | None
    extra: dict[str, Any] = field(default_factory=dict)


def run_trial(config: dict[str, Any], ctx: SweepContext) -> None:
    """Tune function: train this point with its own TorchTrainer, evaluate the best checkpoint, report."""
    from ray.data import DataContext, ExecutionResources
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.evaluate import evaluate_model
    from jobs.tracking import finish_run
    from jobs.train import finish_training, make_trainer

    point = config["point"]
    cfg = build_config(ctx.space, point, ctx.base_overrides)
    trial_id = ray.tune.get_context().get_trial_id()
    # Ray Data sees the whole cluster; cap this trial's input pipeline so concurrent trials share it.
    DataContext.get_current().execution_options.resource_limits = ExecutionResources(cpu=ctx.data_cpus)
    trainer = make_trainer(
        cfg,
        ctx.data_dir,
        run_name=f"{ctx.name}-{trial_id}",  # stable across a resume: the Train run continues
        storage_path=ctx.train_storage,
        mlflow_parent_run_id=ctx.parent_run_id,
        callbacks=[TuneReportCallback()],  # every epoch's rank-0 metrics go to Tune (and ASHA)
    )
    try:
        result = trainer.fit()
    except Exception:
        if trainer.train_loop_config.get("mlflow_run_id"):
            finish_run(trainer.train_loop_config["tracking_uri"], trainer.train_loop_config["mlflow_run_id"], "FAILED")
        raise
    # Only the sweep's best trial gets registered, by the driver once all are done.
    trained = finish_training(cfg, trainer, result, register=False)
    final = {k: v for k, v in trained.metrics.items() if _scalar(v)}
    final.update(final=True, mlflow_run_id=trained.mlflow_run_id, tracking_uri=trained.tracking_uri)
    if trained.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = trained.tracking_uri  # where evaluate logs into the trial's run
    if trained.checkpoint_dir:
        final["checkpoint"] = trained.checkpoint_dir
        try:
            evaluated = evaluate_model(
                trained.checkpoint_dir,
                ctx.data_dir,
                split=cfg.data.val_split,
                max_images=ctx.eval_max_images,
                mlflow_run_id=trained.mlflow_run_id,
            )
        except Exception as exc:  # the trained model stays usable; the row says why it has no scores
            final["eval_error"] = f"{type(exc).__name__}: {exc}"[:300]
        else:
            # final_ce is over the whole split; the training's per-epoch val_ce stays as it was.
            final.update({k: v for k, v in evaluated.items() if _scalar(v) and k not in ("checkpoint", "source")})
    ray.tune.report(final)


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool) or value is None


# ---------------------------------------------------------------------------
# The driver


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(argv)
    from jobs import console

    console.setup_once("sweep", verbose=args.verbose)
    try:
        base_overrides = parse_overrides(extra)
        space = load_space(args.space)
        if args.quick:
            space = space.quick()
        if args.preset:
            if "preset" in space.grid:
                raise ConfigError(f"space {space.name} sweeps the preset itself; drop --preset")
            space.base_preset = args.preset
        points = expand(space, num_samples=args.num_samples, seed=args.seed)
        trials, errors, notes = resolve(space, points, base_overrides)
    except ConfigError as exc:
        print(f"sweep: {exc}", file=sys.stderr)
        return EXIT_INVALID
    for note in notes:
        print(f"sweep: note: {note}")
    if errors:
        print(f"sweep: {len(errors)} of {len(points)} trial point(s) invalid; nothing launched:", file=sys.stderr)
        for error in errors:
            print(f"  {error}", file=sys.stderr)
        return EXIT_INVALID
    return run_sweep(args, space, trials, base_overrides, notes)


def run_sweep(
    args: argparse.Namespace, space: Space, trials: list[TrialPoint], base_overrides: dict, notes: list[str]
) -> int:
    from jobs.runtime import ensure_ray, free_resources
    from jobs.storage import StorageError, storage_uri
    from jobs.train import check_data

    name = args.name or f"sweep-{space.name.split()[0]}"
    try:  # a bad data folder or storage URI fails here, before Ray, not in every trial
        storage = storage_uri(args.storage or trials[0].config.train.storage_path or "runs")
        data_dir = storage_uri(args.data)
        check_data(trials[0].config, data_dir)
    except StorageError as exc:  # jobs.dataset.DataError included
        print(f"sweep: error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    experiment = f"{storage}/{name}"
    metric = args.metric
    mode = args.mode or sweep_report.default_mode(metric)
    # ASHA compares trials every epoch, so it needs a metric every epoch reports.
    stop_metric, stop_mode = (metric, mode) if metric in PER_EPOCH_METRICS else ("val_ce", "min")

    print(f"sweep {name}: space {space.name}, {len(trials)} trial(s) -> {experiment}")
    print(f"sweep: Ray: {ensure_ray()}")
    from jobs import console

    if not args.verbose and console.ray_logs():
        print(f"sweep: worker logs in {console.ray_logs()}")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")  # experiment state saved often: cheap, resumable
    # Free, not total: CPUs another job already holds would leave trials' data tasks no CPU (a deadlock).
    resources = plan_resources(
        trials,
        free_resources(),
        driver_cpus=args.trial_cpus,
        data_cpus=args.data_cpus,
        max_concurrent=args.max_concurrent,
    )
    gpu = f" + {resources.worker_gpus:g} GPU" if resources.worker_gpus else ""
    print(
        f"sweep: per trial {resources.driver_cpus:g} CPU (Tune function) + {resources.worker_cpus:g} CPU{gpu} (workers)"
        f" + {resources.data_cpus:g} CPU (Ray Data); concurrency {resources.concurrency} ({resources.why})"
    )

    meta = _load_or_create_meta(experiment, name, space, trials, args, metric, mode)
    if meta is None:
        return EXIT_INVALID
    ctx = SweepContext(
        name=name,
        space=space,
        base_overrides=base_overrides,
        data_dir=data_dir,
        train_storage=f"{experiment}/train",
        parent_run_id=meta.get("parent_run_id"),
        data_cpus=args.data_cpus,
        eval_max_images=args.eval_max_images,
    )
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, ctx=ctx), {"cpu": args.trial_cpus})
    scheduler = make_scheduler(args, max(t.config.train.epochs for t in trials), stop_metric, stop_mode)
    if ray.tune.Tuner.can_restore(experiment):
        print(f"sweep: resuming {experiment} (finished trials are kept, unfinished ones continue)")
        tuner = ray.tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = ray.tune.Tuner(
            trainable,
            param_space={"point": ray.tune.grid_search([t.values for t in trials])},
            tune_config=ray.tune.TuneConfig(
                metric=stop_metric,
                mode=stop_mode,
                scheduler=scheduler,
                max_concurrent_trials=resources.concurrency,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=ray.tune.RunConfig(
                name=name,
                storage_path=storage,
                callbacks=[Progress()],
                verbose=0,
                failure_config=ray.tune.FailureConfig(max_failures=1),
            ),
        )
    started = time.perf_counter()
    with releasing_orphaned_groups():
        grid = tuner.fit()
    print(f"sweep: all trials done in {time.perf_counter() - started:.0f}s")
    rows = collect_rows(grid, space, base_overrides)
    return sweep_report.publish(
        rows, space=space, experiment=experiment, meta=meta, metric=metric, mode=mode, notes=notes
    )


def actor_groups() -> list[tuple[bytes, bool]]:
    """(id, creator dead) of this job's placement groups that an actor created and that are not removed yet.

    Groups created by the driver itself (Tune's trial groups) and detached ones are never listed.
    """
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    job = bytes.fromhex(ray.get_runtime_context().get_job_id())
    out = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        removed = pg.state == gcs_pb2.PlacementGroupTableData.REMOVED
        # The driver's own groups (Tune's trial groups) have a nil creator actor, which Ray reports as dead.
        by_actor = pg.creator_actor_id != b"\xff" * len(pg.creator_actor_id)
        if not removed and by_actor and not pg.is_detached and pg.creator_job_id == job:
            out.append((pg.placement_group_id, pg.creator_actor_dead))
    return out


def orphaned_groups() -> list[bytes]:
    """Ids of this job's actor-created groups whose creating actor is dead (see `actor_groups`).

    Such a group can never be used again (only its creator schedules into it) and Ray keeps it until the
    job ends.
    """
    return [pg_id for pg_id, dead in actor_groups() if dead]


def release_orphaned_groups() -> int:
    """Remove the groups `orphaned_groups` lists; returns how many."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    ids = orphaned_groups()
    for pg_id in ids:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg_id)))
    return len(ids)


@contextmanager
def releasing_orphaned_groups(interval_s: float = 1.0, settle_s: float = 20.0) -> Iterator[None]:
    """Release orphaned placement groups every `interval_s` while the block runs, and after it until none is left.

    When `Tuner.fit` returns, the Train controller of the last stopped trial may still be shutting down: its
    worker group's placement group is not orphaned yet (creator alive) and becomes so a moment later. So the
    block waits up to `settle_s` for this job's actor-created groups to go, releasing each as its creator dies
    (a single check right after `fit` left a train node's CPUs held in a CI run).
    """
    stop = threading.Event()

    def release() -> None:
        try:
            if n := release_orphaned_groups():
                print(f"sweep: released {n} placement group(s) of stopped trials", flush=True)
        except Exception as exc:  # a GCS hiccup must not end the sweep; the next round retries
            print(f"sweep: could not check placement groups: {exc}", flush=True)

    def loop() -> None:
        while not stop.wait(interval_s):
            release()

    reaper = threading.Thread(target=loop, name="sweep-pg-reaper", daemon=True)
    reaper.start()
    try:
        yield
    finally:
        stop.set()
        reaper.join(timeout=10)
        release()
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline and actor_groups():
            time.sleep(0.2)
            release()


def make_scheduler(args: argparse.Namespace, epochs: int, metric: str, mode: str) -> Any:
    """ASHA over epochs, deciding at most at epoch `epochs - 1`.

    A trial that survives to the last rung trains on to its final epoch (stop_last_trials=False) and
    then reports its evaluation row; a rung on the final epoch itself would save no training, only
    cut the trial off before that evaluation.
    """
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if args.scheduler == "fifo" or epochs < 2:
        print("sweep: no early stopping" + (" (trials train 1 epoch)" if args.scheduler == "asha" else ""))
        return FIFOScheduler()
    max_t = epochs - 1
    grace = max(1, min(args.grace_period, max_t))
    print(f"sweep: ASHA on {metric} ({mode}): first decision at epoch {grace}, last at {max_t}, of {epochs}")
    return ASHAScheduler(
        time_attr="epoch",
        max_t=max_t,
        grace_period=grace,
        reduction_factor=args.reduction_factor,
        stop_last_trials=False,
    )


def trial_dirname(trial: Any) -> str:
    """Short trial folders: the swept values live in the table, not in path names."""
    return f"trial_{trial.trial_id}"


class Progress(Callback):
    """One console line per trial start / finish, with the swept values (the resume test reads them)."""

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"sweep: trial {trial.trial_id} started: {describe(trial.config['point'])}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        how = "finished" if last.get("final") else f"stopped early at epoch {last.get('epoch')}"
        print(f"sweep: trial {trial.trial_id} {how}: val_ce={last.get('val_ce')}", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"sweep: trial {trial.trial_id} failed: see {trial.path}", flush=True)


# ---------------------------------------------------------------------------
# Results


def collect_rows(grid: Any, space: Space, base_overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """One table row per trial: swept values, the config columns, and its metrics."""
    rows = []
    for result in grid:
        point = result.config["point"]
        cfg = build_config(space, point, base_overrides)
        metrics = dict(result.metrics or {})
        frame = result.metrics_dataframe
        epochs = int(frame["epoch"].max()) if frame is not None and "epoch" in frame and len(frame) else 0
        if result.error is not None:
            status = "error"
        elif metrics.get("final"):
            status = "completed"
        else:
            status = f"stopped at {epochs}/{cfg.train.epochs}"
        row: dict[str, Any] = {"trial": metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_")}
        row.update(point)
        row.update(
            conditioning=cfg.model.conditioning,
            K=cfg.model.num_latent_vectors,
            bottleneck=cfg.model.bottleneck,
            plan_len=cfg.model.plan_len,
            embed_dim=cfg.model.embed_dim,
            image_size=cfg.model.image_size,
            plan_bytes=cfg.model.plan_len * cfg.model.embed_dim * 2,  # fp16 (P, D)
            epochs=epochs,
            max_epochs=cfg.train.epochs,
            status=status,
        )
        if cfg.model.bottleneck == "none":  # K is inert: the decoder reads all plan_len patch features
            row["K"] = None
            row.update({k: None for k in point if k == "model.num_latent_vectors"})
        kept = (*sweep_report.METRIC_COLUMNS, "bleu4", "collapse_verdict", "eval_error", *TRIAL_LINKS)
        row.update({k: metrics[k] for k in kept if k in metrics and k not in row})
        if result.error is not None:
            row["error"] = str(result.error).splitlines()[0][:200]
        rows.append(row)
    return sorted(rows, key=lambda r: str(r["trial"]))


# ---------------------------------------------------------------------------
# MLflow: the sweep's parent run


def _open_parent(cfg: Any, name: str, space: Space, n_trials: int, metric: str) -> tuple[str, str] | tuple[None, None]:
    if not cfg.tracking.enabled:
        return None, None
    from mlflow import MlflowClient

    from jobs.tracking import ensure_experiment, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, cfg.tracking.experiment, uri)
    run = client.create_run(experiment_id, run_name=f"sweep-{name}", tags={"vljepa.sweep": name})
    params = {
        "sweep.space": space.name,
        "sweep.trials": n_trials,
        "sweep.metric": metric,
        "sweep.axes": ",".join(space.axes),
    }
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value)[:500])
    return uri, run.info.run_id


# ---------------------------------------------------------------------------
# Sweep identity on storage: what resuming checks


def _load_or_create_meta(
    experiment: str, name: str, space: Space, trials: list[TrialPoint], args: argparse.Namespace, metric: str, mode: str
) -> dict[str, Any] | None:
    """Re-running a name must mean the same trials: otherwise say so instead of mixing two sweeps."""
    points = json.loads(json.dumps([t.values for t in trials], default=str))
    existing = _read_text(f"{experiment}/{META_FILE}")
    if existing is not None:
        meta = json.loads(existing)
        if meta.get("points") != points:
            print(
                f"sweep: {experiment} holds sweep {name!r} with different trial points; use another --name",
                file=sys.stderr,
            )
            return None
        return meta
    uri, parent = _open_parent(trials[0].config, name, space, len(trials), metric)
    meta = {"name": name, "space": space.name, "points": points, "metric": metric, "mode": mode}
    meta.update(tracking_uri=uri, parent_run_id=parent, argv=sys.argv[1:])
    _write_text(f"{experiment}/{META_FILE}", json.dumps(meta, indent=2, sort_keys=True))
    return meta


def _read_text(where: str) -> str | None:
    from jobs.storage import resolve

    file = resolve(where)
    return file.read_bytes().decode("utf-8") if file.is_file() else None


def _write_text(where: str, text: str) -> None:
    from jobs.storage import resolve

    resolve(where).write_bytes(text.encode("utf-8"))


# ---------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.sweep",
        description="Ray Tune sweep of training jobs; extra --section.key=value arguments override the base config.",
    )
    p.add_argument("--space", required=True, help="log_runs | bottleneck | scale | a JSON/YAML space file")
    p.add_argument("--data", required=True, help="prepared data root (local folder or URI every node can read)")
    p.add_argument("--preset", default=None, help="base preset instead of the space's")
    p.add_argument("--quick", action="store_true", help="laptop size: tiny model, 3 epochs, smaller grids")
    p.add_argument("--num-samples", type=int, default=1, help="repeats of the grid; random axes drawn anew each time")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing random axes (before launch)")
    p.add_argument("--max-concurrent", type=int, default=None, help="cap on trials at once (default: what fits)")
    p.add_argument("--metric", default="val_ce", help="ranks trials and is plotted (default val_ce)")
    p.add_argument("--mode", choices=("min", "max"), default=None, help="default: max for scores, min for losses")
    p.add_argument("--name", default=None, help="sweep name; the same name again resumes it")
    p.add_argument(
        "--storage", default=None, help="where trials and the report go (default: train.storage_path or ./runs)"
    )
    p.add_argument("--scheduler", choices=("asha", "fifo"), default="asha")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA: keep 1/this of trials per rung")
    p.add_argument("--trial-cpus", type=float, default=1.0, help="CPUs held by each trial's Tune function")
    p.add_argument("--data-cpus", type=float, default=1.0, help="Ray Data CPU budget of each trial")
    p.add_argument("--eval-max-images", type=int, default=None, help="evaluate each trial on at most N images")
    p.add_argument("--verbose", action="store_true", help="show library and worker output here too")
    return p


if __name__ == "__main__":
    sys.exit(main())
