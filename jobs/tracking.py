"""MLflow tracking: where runs go, what a training run records, and how a trained model comes back.

The driver opens (or, on resume, re-opens) one MLflow run per training run and logs the flattened
config as params. The rank-0 Ray Train worker logs per-epoch metrics and a table of sample captions
with their images into that run through `EpochLogger`. When training ends the driver logs the best
checkpoint, wraps it as an MLflow model and registers a new version under an alias, so
`models:/NAME@ALIAS` resolves anywhere the tracking server is reachable: `jobs.checkpoints` turns it
back into a local checkpoint, and `mlflow.pyfunc.load_model` into a captioner that needs no checkout
(`jobs/captioner_pyfunc.py`).

Every MLflow import of the project lives in jobs/; model/ never sees it.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
from mlflow import MlflowClient

from jobs.checkpoints import resolve_tracking_uri
from model.checkpoint import CHECKPOINT_FILE
from model.config import Config

ROOT = Path(__file__).resolve().parents[1]
PYFUNC_CODE = ROOT / "jobs" / "captioner_pyfunc.py"
MODEL_PACKAGE = ROOT / "model"
MODEL_ARTIFACT = "captioner"  # the pyfunc model's folder among the run's artifacts
RUNTIME_DISTRIBUTIONS = ("mlflow", "torch", "numpy", "pillow", "safetensors")
RUN_TAG = "vljepa.train_run"  # "<storage>/<run name>": how a resumed training run finds its MLflow run
SAMPLES_TABLE = "sample_captions.json"


# ---------------------------------------------------------------------------
# Where runs go (the tracking URI itself is resolved by jobs.checkpoints.resolve_tracking_uri)


def _artifact_root(tracking_uri: str) -> str | None:
    """Local artifact folder beside a sqlite database (`mlartifacts/`); a server chooses its own."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///") :])
    return (db.parent / "mlartifacts").as_uri()


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Experiment id for `name`, creating it with an absolute artifact location if needed."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    root = _artifact_root(tracking_uri)
    location = f"{root}/{name}" if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another process (a sweep trial) created it between the lookup and the create.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _client(tracking_uri: str) -> MlflowClient:
    """A client whose model registry is the tracking store itself (never a registry URI left global)."""
    return MlflowClient(tracking_uri, registry_uri=tracking_uri)


def ui_command(tracking_uri: str) -> str:
    """The command that shows these runs in a browser."""
    if tracking_uri.startswith("sqlite:///"):
        return f"mlflow ui --backend-store-uri {tracking_uri}"
    return f"open {tracking_uri} in a browser"


# ---------------------------------------------------------------------------
# The run: opened by the driver, written to by rank 0


def open_run(
    cfg: Config,
    *,
    run_name: str,
    run_key: str,
    resume: bool,
    parent_run_id: str | None = None,
) -> tuple[str, str]:
    """Start the MLflow run of a training run (or re-open it when resuming). Returns (tracking_uri, run_id).

    `run_key` identifies the training run across restarts (storage path + run name); with `resume`
    the newest MLflow run tagged with it is continued so metrics stay in one place.
    """
    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    client = _client(tracking_uri)
    experiment_id = ensure_experiment(client, cfg.tracking.experiment, tracking_uri)
    run_id = None
    if resume:
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{RUN_TAG}` = '{_quote(run_key)}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
    if run_id is None:
        tags = {RUN_TAG: run_key, "vljepa.preset": cfg.preset}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    log_config(client, run_id, cfg)
    return tracking_uri, run_id


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def log_config(client: MlflowClient, run_id: str, cfg: Config) -> None:
    """Flattened config as params. MLflow params are immutable, so a resumed run that changed a value
    (typically `train.epochs`) records the change as a tag instead of failing."""
    existing = client.get_run(run_id).data.params
    new = {key: _param_value(value) for key, value in cfg.flat().items()}
    fresh = [mlflow.entities.Param(k, v) for k, v in new.items() if k not in existing]
    changed = {
        f"resume.changed.{k}": f"{existing[k]} -> {v}" for k, v in new.items() if k in existing and existing[k] != v
    }
    for start in range(0, len(fresh), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=fresh[start : start + 100])
    for key, value in changed.items():
        client.set_tag(run_id, key, value)
    client.log_text(run_id, json.dumps(cfg.to_dict(), indent=2, sort_keys=True), "config.json")


def _param_value(value: Any) -> str:
    return str(value) if value != "" else '""'  # an empty string reads as "unset" in the MLflow UI


class EpochLogger:
    """What the rank-0 worker writes each epoch: metrics (step = epoch) and sample captions."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.client = _client(tracking_uri)
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        values = [
            mlflow.entities.Metric(key, float(value), timestamp=_now_ms(), step=step)
            for key, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        ]
        self.client.log_batch(self.run_id, metrics=values)

    def log_samples(
        self,
        epoch: int,
        images: Sequence[Any],
        references: Sequence[str],
        captions: Sequence[str],
    ) -> None:
        """Append this epoch's greedy captions, with their images, to the run's sample table."""
        if not captions:
            return
        table = {
            "epoch": [epoch] * len(captions),
            "image": list(images),
            "reference": list(references),
            "greedy": list(captions),
        }
        self.client.log_table(self.run_id, data=table, artifact_file=SAMPLES_TABLE)
        lines = ["| # | reference | greedy |", "|---|---|---|"]
        lines += [f"| {i} | {r} | {c} |" for i, (r, c) in enumerate(zip(references, captions, strict=True))]
        self.client.log_text(self.run_id, "\n".join(lines) + "\n", f"samples/epoch_{epoch:03d}.md")


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------
# The trained model: logged, registered, fetched back


@dataclass
class RegisteredModel:
    name: str
    version: str
    uri: str  # models:/NAME/VERSION
    alias_uri: str  # models:/NAME@ALIAS


def log_and_register(
    cfg: Config,
    tracking_uri: str,
    run_id: str,
    checkpoint_dir: str | Path,
    final_metrics: dict[str, Any],
) -> RegisteredModel | None:
    """Log the checkpoint and an MLflow model wrapping it; register a new version with the alias.

    Everything goes through an `MlflowClient` bound to `tracking_uri`: the model is saved to a local
    folder and uploaded as run artifacts, then registered from there, so MLflow's process-wide
    tracking and registry URIs are never written.
    """
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_FILE
    client = _client(tracking_uri)
    client.log_artifact(run_id, str(checkpoint), artifact_path="checkpoint")
    client.log_text(run_id, json.dumps(final_metrics, indent=2, sort_keys=True, default=str), "final_metrics.json")
    with tempfile.TemporaryDirectory(prefix="vljepa-pyfunc-") as tmp:
        local = Path(tmp) / MODEL_ARTIFACT
        mlflow.pyfunc.save_model(
            path=str(local),
            python_model=str(PYFUNC_CODE),  # "models from code": this file is stored, not a pickle
            artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(MODEL_PACKAGE)],  # model/ travels with the model: no checkout needed to load it
            pip_requirements=runtime_requirements(),  # explicit: inferring them would load the model
        )
        _drop_bytecode(local)
        client.log_artifacts(run_id, str(local), artifact_path=MODEL_ARTIFACT)
    name = cfg.tracking.registered_model
    if not name:
        return None
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source, run_id=run_id)
    if cfg.tracking.alias:
        client.set_registered_model_alias(name, cfg.tracking.alias, version.version)
    alias_uri = f"models:/{name}@{cfg.tracking.alias}" if cfg.tracking.alias else f"models:/{name}/{version.version}"
    return RegisteredModel(name, str(version.version), f"models:/{name}/{version.version}", alias_uri)


def runtime_requirements() -> list[str]:
    """Pip requirements of the pyfunc: what `model/` and the wrapper import, pinned to the versions
    installed here (public version: torch's "+cpu" build label is not a PyPI version)."""
    return [f"{dist}=={importlib.metadata.version(dist).split('+')[0]}" for dist in RUNTIME_DISTRIBUTIONS]


def _drop_bytecode(folder: Path) -> None:
    """code_paths copies the package folder as it is; compiled caches are machine-specific noise."""
    for cache in folder.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(tracking_uri).set_terminated(run_id, status=status)
