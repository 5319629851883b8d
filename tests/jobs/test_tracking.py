"""MLflow tracking on a real sqlite store: URI resolution, params on resume, log + register + fetch back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from jobs import tracking
from model.checkpoint import load_model, save_model
from model.config import load_config
from model.model import build_model


@pytest.fixture()
def store(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture()
def debug_checkpoint(tmp_path) -> Path:
    cfg = load_config("debug")
    torch.manual_seed(0)
    folder = tmp_path / "ckpt"
    save_model(folder / "model.safetensors", build_model(cfg.model), cfg)
    return folder


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    # default: an absolute sqlite path in the cwd, so Ray workers elsewhere reach the same file
    assert tracking.resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel/x.db")
    assert tracking.resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'rel' / 'x.db'}"
    assert tracking.resolve_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"


def test_fetch_checkpoint_local_paths(debug_checkpoint, tmp_path):
    file = debug_checkpoint / "model.safetensors"
    assert tracking.fetch_checkpoint(str(file)) == file
    assert tracking.fetch_checkpoint(str(debug_checkpoint)) == file
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        tracking.fetch_checkpoint(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        tracking.fetch_checkpoint(str(tmp_path / "empty"))


def test_resumed_run_keeps_params_and_records_changes(store):
    cfg = load_config("debug", ["--train.epochs=2"])
    uri, run_id = tracking.open_run(cfg, run_name="r", run_key="/runs/r", resume=False)
    assert uri == store
    params = MlflowClient(uri).get_run(run_id).data.params
    assert params["train.epochs"] == "2" and params["model.embed_dim"] == "32"
    assert params["train.storage_path"] == '""'

    # Same training run, more epochs: the same MLflow run continues; the change becomes a tag.
    longer = load_config("debug", ["--train.epochs=3"])
    _, again = tracking.open_run(longer, run_name="r", run_key="/runs/r", resume=True)
    assert again == run_id
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params["train.epochs"] == "2"
    assert run.data.tags["resume.changed.train.epochs"] == "2 -> 3"
    # A different key is a different training run.
    _, other = tracking.open_run(longer, run_name="r", run_key="/runs/other", resume=True)
    assert other != run_id


def test_log_register_and_fetch_by_alias(store, debug_checkpoint, tmp_path):
    cfg = load_config("debug", ["--tracking.registered_model=test-captioner", "--tracking.alias=best"])
    uri, run_id = tracking.open_run(cfg, run_name="reg", run_key="/runs/reg", resume=False)
    logger = tracking.EpochLogger(uri, run_id)
    logger.log_metrics({"val_ce": 3.5, "epoch": 1, "note": "skipped: not a number"}, step=1)
    logger.log_metrics({"val_ce": 3.0, "epoch": 2}, step=2)
    image = __import__("PIL.Image", fromlist=["Image"]).new("RGB", (8, 8), (200, 10, 10))
    logger.log_samples(1, [image], ["a red square"], ["a red"])
    logger.log_samples(2, [image], ["a red square"], ["a red square"])

    first = tracking.log_and_register(cfg, uri, run_id, debug_checkpoint, {"epoch": 2})
    second = tracking.log_and_register(cfg, uri, run_id, debug_checkpoint, {"epoch": 2})
    assert (first.version, second.version) == ("1", "2")
    # Registering left no process-wide registry behind: a client for another store registers there.
    assert "MLFLOW_REGISTRY_URI" not in os.environ
    elsewhere = f"sqlite:///{tmp_path / 'other.db'}"
    MlflowClient(elsewhere).create_registered_model("elsewhere")
    assert [m.name for m in MlflowClient(elsewhere, registry_uri=elsewhere).search_registered_models()] == ["elsewhere"]
    assert second.alias_uri == "models:/test-captioner@best"
    client = MlflowClient(uri, registry_uri=uri)
    assert str(client.get_model_version_by_alias("test-captioner", "best").version) == "2"

    history = client.get_metric_history(run_id, "val_ce")
    assert [(m.step, m.value) for m in history] == [(1, 3.5), (2, 3.0)]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"checkpoint", "config.json", "sample_captions.json", "samples"} <= artifacts
    table = json.loads(Path(client.download_artifacts(run_id, tracking.SAMPLES_TABLE, str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [(r["epoch"], r["greedy"]) for r in rows] == [(1, "a red"), (2, "a red square")]
    assert all(r["image"]["type"] == "image" for r in rows)  # the images are logged beside the table

    # The alias resolves to a local safetensors file holding the same weights.
    fetched = tracking.fetch_checkpoint(second.alias_uri)
    original = load_model(debug_checkpoint / "model.safetensors")
    assert fetched.name == "model.safetensors"
    assert load_model(fetched).fingerprint == original.fingerprint
    run_copy = tracking.fetch_checkpoint(f"runs:/{run_id}/checkpoint")
    assert load_model(run_copy).fingerprint == original.fingerprint

    # The MLflow model is a pyfunc that captions image bytes without unpickling torch objects.
    model = tracking.mlflow.pyfunc.load_model(second.uri)
    png = tmp_path / "x.png"
    image.resize((16, 16)).save(png)
    captions = model.predict([png.read_bytes()])
    assert isinstance(captions, list) and len(captions) == 1 and isinstance(captions[0], str)
