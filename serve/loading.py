"""Where the served weights come from: a local safetensors file or folder, or an MLflow URI.

A replica calls `resolve_model` once at start-up. Local paths are used in place; `models:/NAME@ALIAS`,
`models:/NAME/VERSION` and `runs:/RUN_ID/PATH` are downloaded with MLflow into a local folder first.
Either way the result is the path of one `model.safetensors` that `model.checkpoint` can load, plus a
short description of the source for the `/v1/model` route.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_NAME = "model.safetensors"
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "http://", "https://")
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))?")


class ModelSourceError(ValueError):
    """The model source does not name a readable checkpoint."""


@dataclass(frozen=True)
class ResolvedModel:
    """A local checkpoint file and what it was resolved from."""

    path: Path  # the model.safetensors file
    source: str  # the source as configured (path or URI)
    name: str  # registered model name, or the checkpoint's folder name
    version: str  # registry version, or "local"
    download_dir: Path | None = None  # temporary copy of an MLflow artifact, removed by release()

    def release(self) -> None:
        """Delete the downloaded copy once the weights are in memory (local paths are left alone)."""
        if self.download_dir is not None:
            shutil.rmtree(self.download_dir, ignore_errors=True)


def is_mlflow_uri(source: str) -> bool:
    return source.startswith(MLFLOW_SCHEMES)


def resolve_model(source: str, *, tracking_uri: str | None = None, cache_dir: str | None = None) -> ResolvedModel:
    """Turn a configured model source into a local checkpoint file.

    tracking_uri: MLflow tracking/registry URI; defaults to $MLFLOW_TRACKING_URI.
    cache_dir: where MLflow downloads go (kept); None: a temporary folder that `release()` deletes.
    """
    source = source.strip()
    if not source:
        raise ModelSourceError("no model source given: set args.model to a checkpoint path or a models:/ URI")
    if not is_mlflow_uri(source):
        path = find_checkpoint(Path(source).expanduser())
        return ResolvedModel(path=path, source=source, name=path.parent.name or path.stem, version="local")

    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    dst = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="vljepa-serve-"))
    local = _download(source, tracking_uri=tracking_uri, dst=dst)
    name, version = _registry_identity(source, tracking_uri)
    path = find_checkpoint(Path(local))
    return ResolvedModel(path, source, name, version, download_dir=None if cache_dir else dst)


def find_checkpoint(path: Path) -> Path:
    """The safetensors file at `path`: the file itself, `path/model.safetensors`, or the only one below."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelSourceError(f"{path} is not a .safetensors checkpoint")
        return path
    if not path.is_dir():
        raise ModelSourceError(f"model path {path} does not exist")
    direct = path / CHECKPOINT_NAME
    if direct.is_file():
        return direct
    found = sorted(path.rglob("*.safetensors"))
    named = [p for p in found if p.name == CHECKPOINT_NAME]
    candidates = named or found
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ModelSourceError(f"no {CHECKPOINT_NAME} under {path}")
    listing = ", ".join(str(p.relative_to(path)) for p in candidates[:5])
    raise ModelSourceError(f"several checkpoints under {path} ({listing}); point args.model at one file")


def _download(uri: str, *, tracking_uri: str | None, dst: Path) -> str:
    import mlflow  # serve-only dependency, imported lazily so local paths never need it
    import mlflow.artifacts

    if tracking_uri:
        # download_artifacts resolves models:/ through an internal client that reads the global URIs,
        # not its arguments; a replica serves one model, so setting them process-wide is safe.
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    try:
        with _host_lock(tracking_uri or ""):
            return mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri, registry_uri=tracking_uri
            )
    except Exception as exc:  # MLflow raises its own exception types for every failure mode
        where = tracking_uri or "the default MLflow tracking URI"
        raise ModelSourceError(f"could not download {uri} from {where}: {exc}") from exc


@contextlib.contextmanager
def _host_lock(key: str) -> Iterator[None]:
    """One MLflow client at a time per tracking store on this host.

    Replicas start together; against a sqlite store each one may decide the schema needs creating
    (MLflow checks for the tables of the ORM modules it has imported so far) and run the migrations
    at the same moment, which fails with "table _alembic_tmp_... already exists".
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; replicas there are rare
        yield
        return
    name = hashlib.sha256(key.encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"vljepa-mlflow-{name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _registry_identity(uri: str, tracking_uri: str | None) -> tuple[str, str]:
    """(name, version) for a models:/ URI, the alias resolved to its version number when possible."""
    match = _MODELS_URI.match(uri)
    if not match:
        return uri.rstrip("/").rsplit("/", 1)[-1], "run-artifact"
    name, alias, version = match["name"], match["alias"], match["version"]
    if alias:
        try:
            from mlflow import MlflowClient

            version = (
                MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
                .get_model_version_by_alias(name, alias)
                .version
            )
        except Exception:  # the download already succeeded; the number is only informative
            version = f"@{alias}"
    return name, str(version or "latest")
