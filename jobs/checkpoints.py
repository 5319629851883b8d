"""Which checkpoint a model source names: the one rule `jobs.evaluate`, `serve` and the demos share.

    resolve_checkpoint("runs/shapes/model.safetensors")        the file itself
    resolve_checkpoint("runs/shapes/checkpoint_000003")        FOLDER/model.safetensors
    resolve_checkpoint("runs/shapes")                          a run folder: the best checkpoint below it
    resolve_checkpoint("models:/vl-jepa-captioner@champion")   the registered version, downloaded
    resolve_checkpoint("runs:/RUN_ID/checkpoint")              a run artifact, downloaded

A folder with several `model.safetensors` below it (a Ray Train run folder keeps the best N epochs)
resolves to the checkpoint `jobs.train` itself registers: the lowest `val_ce` recorded in the
checkpoints' metadata, else (no validation split) the latest `epoch`. That choice is only made among
checkpoints of one training run (same stored config, `train.epochs` aside, which a resume may raise);
anything else (checkpoints of different runs, no recorded epoch, a tie) is an error that lists the
candidates, so no caller ever picks one silently.

MLflow URIs are read from one tracking store: the argument, else $MLFLOW_TRACKING_URI, else an
absolute `sqlite:///<cwd>/mlflow.db` (`resolve_tracking_uri`). `models:/` URIs are resolved to a
version with an `MlflowClient` bound to that store, never through MLflow's process-wide URIs.

serve/ imports this module (serve may import jobs/ library modules; jobs/ never imports serve/).
mlflow is imported only when a source needs it, so a local path never pays for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from model.checkpoint import CHECKPOINT_FILE, read_metadata

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "http://", "https://")
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))?(?P<path>/.*)?$")


class CheckpointSourceError(ValueError):
    """The model source does not name exactly one readable checkpoint."""


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """A local checkpoint file and what it was resolved from."""

    path: Path  # the model.safetensors file
    source: str  # the source as given (path or URI)
    name: str  # registered model name, or the checkpoint's folder name
    version: str  # registry version, "local", or "run-artifact"
    download_dir: Path | None = None  # temporary copy of an MLflow artifact, removed by release()

    def release(self) -> None:
        """Delete the downloaded copy once the weights are in memory (local paths are left alone)."""
        if self.download_dir is not None:
            shutil.rmtree(self.download_dir, ignore_errors=True)


# ---------------------------------------------------------------------------
# The tracking store


def resolve_tracking_uri(configured: str | None = "") -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else an absolute `sqlite:///.../mlflow.db` in the cwd.

    The path is made absolute because Ray workers and Serve replicas run in other directories and
    must reach the same database. MLflow 3 refuses plain folder stores, hence sqlite as the default.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "") or "sqlite:///mlflow.db"
    return _absolute_sqlite(uri)


def _absolute_sqlite(uri: str) -> str:
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri.startswith(prefix + "/") or uri == prefix + ":memory:":
        return uri
    return prefix + str(Path(uri[len(prefix) :]).resolve())


def is_mlflow_uri(source: str) -> bool:
    return source.startswith(MLFLOW_SCHEMES)


# ---------------------------------------------------------------------------
# Source -> checkpoint


def resolve_checkpoint(
    source: str, *, tracking_uri: str | None = None, cache_dir: str | Path | None = None
) -> ResolvedCheckpoint:
    """Turn a model source (path or MLflow URI) into one local checkpoint file.

    tracking_uri: MLflow store for URIs; default `resolve_tracking_uri()`.
    cache_dir: where MLflow downloads go (kept); None: a temporary folder that `release()` deletes.
    """
    source = source.strip()
    if not source:
        raise CheckpointSourceError("no model source given: name a checkpoint file or folder, or a models:/ URI")
    if not is_mlflow_uri(source):
        path = find_checkpoint(Path(source).expanduser())
        return ResolvedCheckpoint(path=path, source=source, name=path.parent.name or path.stem, version="local")

    store = resolve_tracking_uri(tracking_uri)
    dst = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="vljepa-model-"))
    try:
        name, version, artifact_uri = _artifact_uri(source, store)
        local = _download(artifact_uri, store, dst, shown=source)
        path = find_checkpoint(Path(local))
    except BaseException:
        if not cache_dir:
            shutil.rmtree(dst, ignore_errors=True)
        raise
    return ResolvedCheckpoint(path, source, name, version, download_dir=None if cache_dir else dst)


def find_checkpoint(path: Path) -> Path:
    """The checkpoint file a local path names: the file itself, FOLDER/model.safetensors, or the one
    chosen among those below FOLDER by `choose_checkpoint`."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointSourceError(f"{path} is not a .safetensors checkpoint")
        return path
    if not path.is_dir():
        raise CheckpointSourceError(f"model path {path} does not exist")
    direct = path / CHECKPOINT_FILE
    if direct.is_file():
        return direct
    found = sorted(path.rglob(CHECKPOINT_FILE))
    if not found:
        raise CheckpointSourceError(f"no {CHECKPOINT_FILE} under {path}")
    return found[0] if len(found) == 1 else choose_checkpoint(found, root=path)


def choose_checkpoint(candidates: list[Path], *, root: Path) -> Path:
    """Among several checkpoints of one training run: the lowest recorded val_ce, else the latest epoch.

    This is the checkpoint `jobs.train` registers. Raises CheckpointSourceError when the candidates
    come from different runs or the recorded figures do not single one out.
    """
    records = [_record(p) for p in candidates]
    pairs = list(zip(candidates, records, strict=True))
    listing = ", ".join(f"{p.relative_to(root)} (epoch {r[1]}, val_ce {r[0]})" for p, r in pairs)
    ambiguous = f"several checkpoints under {root}: {listing}; name one checkpoint file or folder"
    if len({r[2] for r in records}) > 1:
        raise CheckpointSourceError(f"{ambiguous} (they come from differently configured runs)")
    if all(r[0] is not None for r in records):
        best_ce = min(r[0] for r in records)
        keep = [(p, r) for p, r in pairs if r[0] == best_ce]
    else:
        keep = pairs
    if any(r[1] is None for _, r in keep):
        raise CheckpointSourceError(f"{ambiguous} (no epoch recorded to choose by)")
    latest = max(r[1] for _, r in keep)
    chosen = [p for p, r in keep if r[1] == latest]
    if len(chosen) > 1:
        raise CheckpointSourceError(f"{ambiguous} (a tie at epoch {latest})")
    return chosen[0]


def _record(path: Path) -> tuple[float | None, int | None, str]:
    """(val_ce, epoch, config without train.epochs) from a checkpoint's metadata header."""
    meta = read_metadata(path)
    config = json.loads(meta["config"])
    config.get("train", {}).pop("epochs", None)  # a resumed run may raise it
    return _float(meta.get("val_ce")), _int(meta.get("epoch")), json.dumps(config, sort_keys=True)


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


# ---------------------------------------------------------------------------
# MLflow: URI -> artifact location -> local copy


def _artifact_uri(source: str, store: str) -> tuple[str, str, str]:
    """(name, version, artifact URI to download) for a source; models:/ resolved with an explicit client.

    MLflow's own models:/ download reads the process-wide registry URI, whatever it is passed, so
    the version's storage location is looked up here instead.
    """
    match = _MODELS_URI.match(source)
    if not match:
        return source.rstrip("/").rsplit("/", 1)[-1], "run-artifact", source
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, alias, version, sub = match["name"], match["alias"], match["version"], match["path"] or ""
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    try:
        with _store_lock(store):
            if alias:
                version = str(client.get_model_version_by_alias(name, alias).version)
            elif version is None or version == "latest":
                versions = client.search_model_versions(f"name = '{name}'")
                if not versions:
                    raise CheckpointSourceError(f"registered model {name!r} has no versions in {store}")
                version = str(max(int(v.version) for v in versions))
            location = client.get_model_version_download_uri(name, version)
    except MlflowException as exc:
        raise CheckpointSourceError(f"could not resolve {source} in {store}: {exc.message}") from exc
    return name, str(version), location.rstrip("/") + sub


def _download(artifact_uri: str, store: str, dst: Path, *, shown: str) -> str:
    import mlflow.artifacts

    try:
        with _store_lock(store):
            return mlflow.artifacts.download_artifacts(
                artifact_uri=artifact_uri, dst_path=str(dst), tracking_uri=store, registry_uri=store
            )
    except Exception as exc:  # MLflow raises its own exception types for every failure mode
        raise CheckpointSourceError(f"could not download {shown} from {store}: {exc}") from exc


@contextlib.contextmanager
def _store_lock(store: str) -> Iterator[None]:
    """One MLflow client at a time per tracking store on this host.

    Serve replicas start together; against a sqlite store each one may decide the schema needs
    creating (MLflow checks for the tables of the ORM modules it has imported so far) and run the
    migrations at the same moment, which fails with "table _alembic_tmp_... already exists".
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        yield
        return
    key = hashlib.sha256(store.encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"vljepa-mlflow-{key}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
