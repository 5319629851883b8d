"""Train the VL-JEPA captioner with Ray Train (Train V2 API), tracked in MLflow.

    python -m jobs.train --preset shapes --data data/shapes-prepared [--train.epochs=30 ...]
    ray job submit --working-dir . -- python -m jobs.train --preset seed_run2 --data /shared/coco-prepared

The driver checks everything it can before touching Ray (config keys, the prepared data folder and
its manifest), then joins or starts Ray and checks the cluster can host the worker group (Ray
would otherwise wait forever for GPUs that never come). It builds a `TorchTrainer` whose workers
run `jobs.train_loop.train_loop_per_worker`, streams the training split to them as a Ray Dataset,
and keeps the best N epoch checkpoints under `<storage>/<run name>`.

Resuming: Train V2 keeps a checkpoint-manager snapshot in the run folder; a trainer built with the
same run name and storage path finds it and hands its latest checkpoint to the new workers, which
restore weights, optimizer, schedule, epoch and RNG and continue with the next epoch. The same
mechanism restarts the worker group from the last checkpoint after a worker dies (FailureConfig).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # the default in Ray 2.60; explicit for older configs

import ray  # noqa: E402
import ray.train  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

from jobs import dataset  # noqa: E402
from jobs.optim import steps_per_epoch  # noqa: E402
from jobs.runtime import ensure_ray  # noqa: E402
from jobs.storage import Location, StorageError, Where, resolve, storage_uri  # noqa: E402
from jobs.train_loop import VISION_FINGERPRINT_KEY, init_vision, train_loop_per_worker  # noqa: E402
from model.checkpoint import CheckpointError  # noqa: E402
from model.config import PRESETS, Config, ConfigError, load_config  # noqa: E402
from model.model import build_model  # noqa: E402

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Train V2's record of reported checkpoints
FORWARDED_ENV_PREFIX = "VLJEPA_"  # driver env vars copied to the workers (test hooks, autoscaling hint)
AUTOSCALING_ENV = "VLJEPA_EXPECT_AUTOSCALING"  # "1": the cluster adds nodes on demand; skip the GPU check


class PreflightError(RuntimeError):
    """The cluster cannot run this config: raised before any worker is requested."""


@dataclass
class TrainResult:
    checkpoint_dir: str | None  # the best checkpoint folder (model.safetensors + train_state.pt)
    metrics: dict[str, Any]  # the last reported epoch
    mlflow_run_id: str | None
    model_uri: str | None  # models:/NAME/VERSION of the registered version, None if not registered
    alias_uri: str | None = None  # models:/NAME@ALIAS
    run_name: str = ""
    storage_path: str = ""
    tracking_uri: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics of the kept checkpoints


# ---------------------------------------------------------------------------
# Checks that must fail fast


@dataclass(frozen=True)
class Preflight:
    """What the driver learned before touching Ray; handed down so nothing is read or checked twice."""

    cfg: Config  # model.vision_weights made absolute (workers run in other folders)
    data_dir: Location  # the prepared folder: local (absolute) or a URI's filesystem and path
    data: dataset.DataPlan  # splits, training rows (shard files, hold-out rule, cap), validation size
    steps_per_epoch: int  # optimiser steps each worker takes per epoch (the LR horizon's unit)
    vision_fingerprint: str | None  # of the vision tensors in model.vision_weights


def preflight(cfg: Config, data_dir: Where) -> Preflight:
    """Every check that needs no Ray: the data folder, the batch split, the vision weights.

    Raises dataset.DataError or ConfigError with a message naming the offending value. `data_dir` is a
    local folder or a URI (file://, s3://, gs://): resolved here, once, and handed on as a Location.
    """
    t = cfg.train
    if t.batch_size % t.num_workers:
        # Workers step on batch_size // num_workers rows: an uneven split would silently train another batch size.
        raise ConfigError(
            f"train.batch_size={t.batch_size} does not split evenly over train.num_workers={t.num_workers}: "
            f"use a multiple of {t.num_workers}"
        )
    cfg, vision_fingerprint = check_vision_weights(cfg)
    where = dataset.locate(data_dir)
    plan = _plan_data(cfg, where)
    if plan.n_train < t.num_workers:
        raise dataset.DataError(f"{where}: {plan.n_train} training rows cannot feed {t.num_workers} workers")
    return Preflight(
        cfg=cfg,
        data_dir=where,
        data=plan,
        steps_per_epoch=steps_per_epoch(plan.n_train, t.batch_size, t.num_workers),
        vision_fingerprint=vision_fingerprint,
    )


def check_data(cfg: Config, data_dir: Where) -> tuple[int, int]:
    """(training rows, validation images) after checking the prepared folder, its manifests and the
    configured splits (DataError otherwise)."""
    plan = _plan_data(cfg, data_dir)
    return plan.n_train, plan.n_val


def _plan_data(cfg: Config, data_dir: Where) -> dataset.DataPlan:
    plan = dataset.plan_training(data_dir, cfg)
    if plan.n_train == 0:
        raise dataset.DataError(f"{data_dir}: the training split has no rows for this config")
    return plan


def check_vision_weights(cfg: Config) -> tuple[Config, str | None]:
    """(config with an absolute model.vision_weights, fingerprint of those vision tensors or None).

    Loads the file into a freshly built model exactly as the workers will, so a missing file, a file that
    is no checkpoint or a vision encoder of another shape fails here, before Ray starts.
    """
    m = cfg.model
    if m.vision_backbone == "frozen" and not m.vision_weights:
        raise ConfigError(
            "model.vision_backbone=frozen needs model.vision_weights=PATH (the checkpoint whose vision encoder is "
            "frozen): a frozen randomly initialised encoder would be trained around, never trained"
        )
    if not m.vision_weights:
        return cfg, None
    path = Path(m.vision_weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.vision_weights={m.vision_weights}: no such file")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(m, vision_weights=str(path.resolve())))
    try:
        fingerprint = init_vision(build_model(cfg.model), cfg)
    except CheckpointError as exc:
        raise ConfigError(f"model.vision_weights={m.vision_weights}: {exc}") from None
    return cfg, fingerprint


def start_ray(cfg: Config) -> str:
    """Join or start Ray (jobs.runtime) and check, once, that the cluster can host this config."""
    where = ensure_ray()
    check_cluster(cfg)
    return where


def check_cluster(cfg: Config, resources: dict[str, float] | None = None) -> None:
    """Raise PreflightError when the joined cluster cannot host the worker group and its data tasks."""
    res = dict(ray.cluster_resources()) if resources is None else resources
    t = cfg.train
    if _autoscaling_expected():
        return
    if t.use_gpu and res.get("GPU", 0) < t.num_workers:
        raise PreflightError(
            f"train.use_gpu=true with train.num_workers={t.num_workers} needs {t.num_workers} GPU(s), but the "
            f"Ray cluster has {res.get('GPU', 0):g} and no autoscaler to add more. Run with --train.use_gpu=false, "
            f"join a GPU cluster (RAY_ADDRESS), or set {AUTOSCALING_ENV}=1 if nodes are added on demand."
        )
    if t.node_role and res.get(t.node_role, 0) < t.num_workers:
        raise PreflightError(
            f"train.node_role={t.node_role} with train.num_workers={t.num_workers} needs {t.num_workers} unit(s) of "
            f"the custom resource {t.node_role!r}, but the Ray cluster has {res.get(t.node_role, 0):g}: start the "
            f"training nodes with --resources='{{\"{t.node_role}\": N}}' (cluster.yaml) or clear train.node_role"
        )
    need = t.num_workers * t.cpus_per_worker
    have = res.get("CPU", 0)
    if need > have:
        raise PreflightError(
            f"train.num_workers={t.num_workers} x train.cpus_per_worker={t.cpus_per_worker:g} needs {need:g} CPUs, "
            f"but the Ray cluster has {have:g}"
        )
    if have - need < cfg.data.num_cpus_per_map:
        raise PreflightError(
            f"the workers take {need:g} of {have:g} CPUs, leaving less than data.num_cpus_per_map="
            f"{cfg.data.num_cpus_per_map:g} for Ray Data's decode tasks: lower train.cpus_per_worker or num_workers"
        )


def worker_resources(cfg: Config) -> dict[str, float]:
    """What one Ray Train worker asks for: CPUs, a GPU when use_gpu, one unit of the node role when set."""
    t = cfg.train
    out = {"CPU": t.cpus_per_worker, **({"GPU": 1.0} if t.use_gpu else {})}
    if t.node_role:
        out[t.node_role] = 1.0
    return out


def _autoscaling_expected() -> bool:
    """An autoscaling cluster may add GPU nodes later: on a launcher head node, or when told so."""
    if os.environ.get(AUTOSCALING_ENV, "") == "1":
        return True
    return Path("~/ray_bootstrap_config.yaml").expanduser().exists()  # written by `ray up` on the head


# ---------------------------------------------------------------------------
# The trainer


def resolve_storage(cfg: Config, storage_path: str | None = None) -> str:
    """Storage for checkpoints: argument, config, else ./runs; an absolute path (workers run elsewhere) or a
    URI every node opens (s3://, gs://, file://). StorageError for a URI no pyarrow filesystem opens."""
    return storage_uri(storage_path or cfg.train.storage_path or "runs")


def run_exists(storage_path: str, run_name: str) -> bool:
    """Whether Train V2 left a snapshot for this run: then a new trainer resumes it."""
    return (resolve(storage_path) / run_name / SNAPSHOT_FILE).is_file()


def make_trainer(
    cfg: Config,
    data_dir: Where,
    *,
    run_name: str,
    storage_path: str | None = None,
    mlflow_parent_run_id: str | None = None,
    callbacks: Sequence[Any] | None = None,
    checked: Preflight | None = None,
) -> TorchTrainer:
    """A TorchTrainer for this config; opens (or re-opens, when resuming) its MLflow run.

    `checked`: what `preflight` learned (the caller ran it already); None runs it here.
    The MLflow run id is in `trainer.train_loop_config["mlflow_run_id"]` and in every reported metrics
    dict of rank 0; pass the trainer to `finish_training` after `fit()` to log and register the model.
    """
    checked = checked or preflight(cfg, data_dir)
    cfg = checked.cfg
    storage = resolve_storage(cfg, storage_path)
    tracking_uri, run_id = None, None
    if cfg.tracking.enabled:
        from jobs.tracking import open_run

        tracking_uri, run_id = open_run(
            cfg,
            run_name=run_name,
            run_key=f"{storage}/{run_name}",
            resume=run_exists(storage, run_name),
            parent_run_id=mlflow_parent_run_id,
        )
        if checked.vision_fingerprint:
            _log_vision_fingerprint(tracking_uri, run_id, checked.vision_fingerprint)
    clock = dataset.epoch_clock()  # which epoch the data pipeline draws for; rank 0 moves it
    train_ds = dataset.build_train_dataset(checked.data_dir, cfg, clock=clock, plan=checked.data)
    n_val = checked.data.n_val
    loop_config = {
        "epoch_clock": clock,
        "cfg": cfg.to_dict(),
        "data_dir": checked.data_dir,
        "steps_per_epoch": checked.steps_per_epoch,
        "tracking_uri": tracking_uri,
        "mlflow_run_id": run_id,
        VISION_FINGERPRINT_KEY: checked.vision_fingerprint,
    }
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIX)}
    run_config = ray.train.RunConfig(
        name=run_name,
        storage_path=storage,
        # Keep the best N by validation CE (the latest is always kept too: it is what a resume needs).
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=max(1, cfg.train.keep_checkpoints),
            checkpoint_score_attribute="val_ce" if n_val else None,
            checkpoint_score_order="min",
        ),
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        callbacks=list(callbacks or []),
        worker_runtime_env={"env_vars": env} if env else None,
    )
    # Ray Train replaces the dataset's execution options with these: keep the rows in a deterministic order.
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker=worker_resources(cfg),
        ),
        run_config=run_config,
        datasets={"train": train_ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options={"train": ingest}),
    )


def _log_vision_fingerprint(tracking_uri: str, run_id: str, fingerprint: str) -> None:
    """The vision weights' fingerprint as an MLflow param. A resumed run whose file changed fails here:
    MLflow params are immutable, and different weights would make it another experiment."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri).log_param(run_id, VISION_FINGERPRINT_KEY, fingerprint)


def finish_training(cfg: Config, trainer: TorchTrainer, result: Any, *, register: bool = True) -> TrainResult:
    """After `fit()`: pick the best checkpoint, log it to MLflow, register the model, close the run."""
    best = result.best_checkpoints or []
    if cfg.train.keep_checkpoints and best:
        scored = [(c, m) for c, m in best if isinstance(m.get("val_ce"), int | float)]
        checkpoint = min(scored, key=lambda cm: cm[1]["val_ce"])[0] if scored else best[-1][0]
    else:
        checkpoint = result.checkpoint
    checkpoint_dir = checkpoint.path if checkpoint is not None else None
    loop_config = trainer.train_loop_config
    run_id, tracking_uri = loop_config.get("mlflow_run_id"), loop_config.get("tracking_uri")
    metrics = dict(result.metrics or {})
    out = TrainResult(
        checkpoint_dir=checkpoint_dir,
        metrics=metrics,
        mlflow_run_id=run_id,
        model_uri=None,
        run_name=trainer.run_config.name,
        storage_path=trainer.run_config.storage_path,
        tracking_uri=tracking_uri,
        history=[dict(m) for _, m in best],
    )
    if run_id and checkpoint_dir:
        from jobs.tracking import finish_run, log_and_register

        registered = log_and_register(cfg, tracking_uri, run_id, checkpoint_dir, metrics) if register else None
        if registered is not None:
            out.model_uri, out.alias_uri = registered.uri, registered.alias_uri
        finish_run(tracking_uri, run_id)
    return out


def run_training(
    cfg: Config,
    data_dir: Where,
    *,
    run_name: str | None = None,
    storage_path: str | None = None,
    mlflow_parent_run_id: str | None = None,
    register: bool = True,
    callbacks: Sequence[Any] | None = None,
    checked: Preflight | None = None,
    ray_ready: bool = False,
) -> TrainResult:
    """Check, build, fit, log and register: the whole training job, for callers already in Python.

    `callbacks`: Ray Train UserCallbacks, e.g. the epoch bar of `jobs.console.training_progress`.
    `checked`: the caller's `preflight` result; `ray_ready`: the caller ran `start_ray` already."""
    checked = checked or preflight(cfg, data_dir)
    storage_path = resolve_storage(checked.cfg, storage_path)  # a bad URI fails before Ray starts
    if not ray_ready:
        start_ray(checked.cfg)
    name = run_name or cfg.train.run_name or default_run_name(cfg)
    trainer = make_trainer(
        checked.cfg,
        data_dir,
        run_name=name,
        storage_path=storage_path,
        mlflow_parent_run_id=mlflow_parent_run_id,
        callbacks=callbacks,
        checked=checked,
    )
    previous_sigint = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()
    except Exception:
        run_id = trainer.train_loop_config.get("mlflow_run_id")
        if run_id:
            from jobs.tracking import finish_run

            finish_run(trainer.train_loop_config["tracking_uri"], run_id, status="FAILED")
        raise
    finally:
        _restore_sigint(previous_sigint)
        ray.kill(trainer.train_loop_config["epoch_clock"])
    return finish_training(cfg, trainer, result, register=register)


def _restore_sigint(previous: Any) -> None:
    """Drop the SIGINT handler Ray Train V2's `fit()` installs in the main thread.

    Its closure holds the run's TrainController handle, so the controller actor (and the CPUs its
    placement group reserves) outlives `fit()` in a process that goes on to train again (the demo,
    tests, notebooks): later runs then wait for CPUs nobody uses.
    """
    if threading.current_thread() is threading.main_thread() and previous is not None:
        signal.signal(signal.SIGINT, previous)


def default_run_name(cfg: Config) -> str:
    return f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


# ---------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train",
        description="Train the VL-JEPA captioner with Ray Train; --section.key=value arguments override the preset.",
    )
    parser.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESETS)}")
    parser.add_argument(
        "--data", required=True, help="prepared data folder or URI (file://, s3://, gs://) every node can read"
    )
    parser.add_argument("--run-name", default=None, help="same name again resumes that run (default: train.run_name)")
    parser.add_argument("--storage", default=None, help="checkpoint storage path or URI (default: train.storage_path)")
    parser.add_argument("--no-register", action="store_true", help="log to MLflow but do not register a version")
    parser.add_argument("--verbose", action="store_true", help="show library and worker output here too")
    args, overrides = parser.parse_known_args(argv)
    from jobs import console

    console.setup_once("train", verbose=args.verbose)
    try:
        cfg = load_config(args.preset, overrides)
        checked = preflight(cfg, args.data)  # everything that can fail without Ray fails here
        resolve_storage(cfg, args.storage)  # an unknown scheme or bucket fails here too, not after Ray started
    except (ConfigError, StorageError) as exc:  # StorageError includes dataset.DataError
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    try:
        where = start_ray(checked.cfg)
    except PreflightError as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    print(f"train: preset {cfg.preset} on {where}; {cfg.train.num_workers} worker(s), gpu={cfg.train.use_gpu}")
    if not args.verbose and console.ray_logs():
        print(f"train: worker logs in {console.ray_logs()}")
    with console.training_progress(checked.cfg.train.epochs) as callbacks:
        result = run_training(
            checked.cfg,
            args.data,
            run_name=args.run_name,
            storage_path=args.storage,
            register=not args.no_register,
            checked=checked,
            ray_ready=True,
            callbacks=callbacks,
        )
    print_summary(result)
    print(f"  log                {console.log_file()}")
    return 0


def print_summary(result: TrainResult) -> None:
    m = result.metrics
    print(f"train: run {result.run_name} finished at epoch {m.get('epoch')}")
    for key in ("train_loss", "train_ce", "val_ce", "greedy_unique_pct", "exact_match_pct"):
        if key in m:
            print(f"  {key:18s} {m[key]:.4f}")
    print(f"  best checkpoint    {result.checkpoint_dir}")
    if result.mlflow_run_id:
        from jobs.tracking import ui_command

        print(f"  mlflow run         {result.mlflow_run_id}")
        print(f"  registered model   {result.alias_uri or '(not registered)'} ({result.model_uri})")
        print(f"  browse with        {ui_command(result.tracking_uri or '')}")


if __name__ == "__main__":
    sys.exit(main())
