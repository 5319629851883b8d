"""MLflow tracking: where runs go, what a training run records, and how a trained model comes back.

The driver opens (or, on resume, re-opens) one MLflow run per training run and logs the flattened
config as params. The rank-0 Ray Train worker logs per-epoch metrics and a table of sample captions
with their images into that run through `EpochLogger`. When training ends the driver logs the best
checkpoint, wraps it as an MLflow model and registers a new version under an alias, so
`models:/NAME@ALIAS` resolves anywhere the tracking server is reachable.

Every MLflow import of the project lives in jobs/; model/ never sees it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.pyfunc import PythonModel

from model.config import Config

CHECKPOINT_FILE = "model.safetensors"
RUN_TAG = "vljepa.train_run"  # "<storage>/<run name>": how a resumed training run finds its MLflow run
SAMPLES_TABLE = "sample_captions.json"


# ---------------------------------------------------------------------------
# Where runs go


def resolve_tracking_uri(configured: str = "") -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else an absolute `sqlite:///.../mlflow.db` in the cwd.

    The path is made absolute because Ray workers run in other directories and must reach the same
    database. MLflow 3 refuses plain folder stores, hence sqlite as the embedded default.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "") or "sqlite:///mlflow.db"
    return _absolute_sqlite(uri)


def _absolute_sqlite(uri: str) -> str:
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri.startswith(prefix + "/") or uri == prefix + ":memory:":
        return uri
    return prefix + str(Path(uri[len(prefix) :]).resolve())


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


@contextlib.contextmanager
def _fluent_uris(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (log_model, register_model) at `tracking_uri`, then put things back.

    `mlflow.set_tracking_uri` / `set_registry_uri` are process-wide and also export
    MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI; left set, a later client in the same process (a second
    run, a test, a notebook) would silently register its models into this run's store.
    """
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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


class CaptionerModel(PythonModel):
    """pyfunc wrapper: the artifact is the safetensors checkpoint; nothing of torch is pickled.

    `predict` takes a list of encoded images (bytes) and returns greedy captions.
    """

    def load_context(self, context: Any) -> None:
        from model.checkpoint import load_model
        from model.tokenizer import ByteTokenizer
        from model.transform import ImageTransform

        loaded = load_model(context.artifacts["checkpoint"])
        self._model = loaded.model.eval()
        self._tokenizer = ByteTokenizer(loaded.config.model.max_seq_length)
        self._transform = ImageTransform(loaded.config.model.image_size)

    def predict(self, context: Any, model_input: list[bytes], params: dict[str, Any] | None = None) -> list[str]:
        import torch

        from model.generation import caption_images

        if hasattr(model_input, "iloc"):  # a DataFrame with one column of image bytes
            model_input = list(model_input.iloc[:, 0])
        images = torch.stack([self._transform(data) for data in model_input])  # (B, 3, S, S)
        with torch.no_grad():
            return caption_images(self._model, images, self._tokenizer)


_MODEL_CODE = """import mlflow

from jobs.tracking import CaptionerModel

mlflow.models.set_model(CaptionerModel())
"""


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
    """Log the checkpoint and an MLflow model wrapping it; register a new version with the alias."""
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_FILE
    client = _client(tracking_uri)
    client.log_artifact(run_id, str(checkpoint), artifact_path="checkpoint")
    client.log_text(run_id, json.dumps(final_metrics, indent=2, sort_keys=True, default=str), "final_metrics.json")
    name = cfg.tracking.registered_model
    with _fluent_uris(tracking_uri):
        with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
            # "Models from code": MLflow stores this two-line script instead of a pickled object.
            code = Path(tmp) / "captioner_model.py"
            code.write_text(_MODEL_CODE)
            info = mlflow.pyfunc.log_model(
                name="captioner",
                python_model=str(code),
                artifacts={"checkpoint": str(checkpoint)},
                # Explicit requirements: inferring them would load the model in a subprocess.
                pip_requirements=["torch", "safetensors", "numpy", "pillow"],
            )
        if not name:
            return None
        version = mlflow.register_model(info.model_uri, name, await_registration_for=0)
    if cfg.tracking.alias:
        client.set_registered_model_alias(name, cfg.tracking.alias, version.version)
    alias_uri = f"models:/{name}@{cfg.tracking.alias}" if cfg.tracking.alias else f"models:/{name}/{version.version}"
    return RegisteredModel(name, str(version.version), f"models:/{name}/{version.version}", alias_uri)


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(tracking_uri).set_terminated(run_id, status=status)


def fetch_checkpoint(source: str, *, tracking_uri: str = "") -> Path:
    """Local path of `model.safetensors` for a file, a folder holding it, or an MLflow URI.

    MLflow URIs (`models:/NAME@ALIAS`, `models:/NAME/3`, `runs:/ID/checkpoint`, ...) are downloaded
    from the tracking server given here, by $MLFLOW_TRACKING_URI, or the local sqlite default.
    """
    if "://" in source or source.startswith(("models:/", "runs:/")):
        uri = resolve_tracking_uri(tracking_uri)
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=source,
                tracking_uri=uri,
                registry_uri=uri,
                dst_path=tempfile.mkdtemp(prefix="vljepa-model-"),
            )
        )
    else:
        local = Path(source).expanduser()
        if not local.exists():
            raise FileNotFoundError(
                f"no checkpoint at {local}: give a {CHECKPOINT_FILE} file, its folder, or a models:/ URI"
            )
    if local.is_file():
        return local
    found = sorted(local.rglob(CHECKPOINT_FILE), key=lambda p: len(p.parts))
    if not found:
        raise FileNotFoundError(f"{source} holds no {CHECKPOINT_FILE}")
    return found[0]
