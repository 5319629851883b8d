"""MLflow tracking on a real sqlite store: URI resolution, params on resume, log + register + fetch back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from jobs import tracking
from jobs.checkpoints import resolve_checkpoint
from model.checkpoint import CHECKPOINT_FILE, load_model, save_model
from model.config import load_config
from model.model import build_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def store(tmp_path, monkeypatch, mlflow_store) -> str:
    uri = mlflow_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture()
def debug_checkpoint(tmp_path) -> Path:
    cfg = load_config("debug")
    torch.manual_seed(0)
    folder = tmp_path / "ckpt"
    save_model(folder / "model.safetensors", build_model(cfg.model), cfg)
    return folder


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


def test_log_register_and_fetch_by_alias(store, debug_checkpoint, tmp_path, monkeypatch, mlflow_store):
    cfg = load_config("debug", ["--tracking.registered_model=test-captioner", "--tracking.alias=best"])
    uri, run_id = tracking.open_run(cfg, run_name="reg", run_key="/runs/reg", resume=False)
    logger = tracking.EpochLogger(uri, run_id)
    logger.log_metrics({"val_ce": 3.5, "epoch": 1, "note": "skipped: not a number"}, step=1)
    logger.log_metrics({"val_ce": 3.0, "epoch": 2}, step=2)
    image = __import__("PIL.Image", fromlist=["Image"]).new("RGB", (8, 8), (200, 10, 10))
    logger.log_samples(1, [image], ["a red square"], ["a red"])
    logger.log_samples(2, [image], ["a red square"], ["a red square"])

    # Registering writes none of MLflow's process-wide URIs (the client API all the way).
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    global_uris = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    first = tracking.log_and_register(cfg, uri, run_id, debug_checkpoint, {"epoch": 2})
    second = tracking.log_and_register(cfg, uri, run_id, debug_checkpoint, {"epoch": 2})
    assert (first.version, second.version) == ("1", "2")
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == global_uris != (uri, uri)
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    elsewhere = mlflow_store(tmp_path / "other.db")
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
    original = load_model(debug_checkpoint / CHECKPOINT_FILE)
    for source in (second.alias_uri, f"runs:/{run_id}/checkpoint"):
        fetched = resolve_checkpoint(source)
        assert fetched.path.name == CHECKPOINT_FILE
        assert load_model(fetched.path).fingerprint == original.fingerprint
        fetched.release()

    # The MLflow model is a pyfunc that captions image bytes without unpickling torch objects, and
    # loads in a process that cannot import this repository (cwd elsewhere, repo off sys.path, the
    # editable install's finder removed): model/ travels with it as code_paths.
    png = tmp_path / "x.png"
    image.resize((16, 16)).save(png)
    expected = _caption_here(original, png)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_OUTSIDE, second.alias_uri, str(png), str(ROOT)],
        cwd=outside,
        env={**env, "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["before_load"] == {"model": None, "jobs": None}  # the checkout really was out of reach
    assert "/code/model/" in result["model_from"] and not result["model_from"].startswith(str(ROOT / "model"))
    assert result["captions"] == [expected]
    requirements = Path(resolve_checkpoint(second.alias_uri).path).parents[1] / "requirements.txt"
    pins = requirements.read_text().split()
    assert {p.split("==")[0] for p in pins} >= {"torch", "safetensors", "numpy", "pillow", "mlflow"}


def _caption_here(loaded, png: Path) -> str:
    from model.generation import caption_images
    from model.tokenizer import ByteTokenizer
    from model.transform import ImageTransform

    image = ImageTransform(loaded.config.model.image_size)(png.read_bytes()).unsqueeze(0)  # (1, 3, S, S)
    return caption_images(loaded.model, image, ByteTokenizer(loaded.config.model.max_seq_length))[0]


# Runs in a fresh interpreter: drop everything that could import the checkout, then load the pyfunc.
_LOAD_OUTSIDE = """
import importlib.util, json, os, sys
uri, png, repo = sys.argv[1:]
sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.abspath(p) != repo]
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
before = {name: importlib.util.find_spec(name) for name in ("model", "jobs")}
import mlflow.pyfunc
model = mlflow.pyfunc.load_model(uri)
captions = model.predict([open(png, "rb").read()])
print(json.dumps({
    "before_load": {k: (None if v is None else str(v.origin)) for k, v in before.items()},
    "model_from": sys.modules["model"].__file__,
    "captions": captions,
}))
"""
