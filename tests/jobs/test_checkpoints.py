"""jobs.checkpoints: one rule for which checkpoint a source names, shared by jobs.evaluate and serve."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from jobs.checkpoints import CheckpointSourceError, find_checkpoint, resolve_checkpoint, resolve_tracking_uri
from model.checkpoint import CHECKPOINT_FILE, load_model, save_model
from model.config import load_config
from model.model import build_model


def _save(path: Path, seed: int, extra: dict[str, str] | None = None, **overrides) -> str:
    cfg = load_config("debug", overrides)
    torch.manual_seed(seed)
    return save_model(path, build_model(cfg.model), cfg, extra=extra)


@pytest.fixture()
def run_folder(tmp_path) -> tuple[Path, dict[int, str]]:
    """A Ray Train run folder keeping three epochs; epoch 2 has the lowest val_ce."""
    run = tmp_path / "runs" / "shapes"
    prints = {}
    for epoch, val_ce in ((1, "3.0"), (2, "2.0"), (3, "2.5")):
        folder = run / f"checkpoint_2026-11-30_0{epoch}"
        prints[epoch] = _save(folder / CHECKPOINT_FILE, epoch, {"epoch": str(epoch), "val_ce": val_ce})
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    return run, prints


def test_a_run_folder_resolves_to_its_lowest_val_ce(run_folder):
    run, prints = run_folder
    chosen = resolve_checkpoint(str(run))
    assert chosen.path == run / "checkpoint_2026-11-30_02" / CHECKPOINT_FILE
    assert load_model(chosen.path).fingerprint == prints[2]
    # The storage root above several epochs of the same run follows the same rule.
    assert find_checkpoint(run.parent) == chosen.path


def test_serve_loads_what_evaluate_would(run_folder):
    """serve/deployments.py resolves through the same function: the run folder gives the same weights."""
    from serve.deployments import _load

    run, prints = run_folder
    served = _load(str(run), None, 0)
    assert served.path == resolve_checkpoint(str(run)).path
    assert load_model(served.path).fingerprint == prints[2]


def test_without_val_ce_the_latest_epoch_wins(tmp_path):
    run = tmp_path / "run"
    for epoch in (3, 1, 2):
        _save(run / f"c{epoch}" / CHECKPOINT_FILE, epoch, {"epoch": str(epoch)})
    assert find_checkpoint(run) == run / "c3" / CHECKPOINT_FILE
    # Only some record val_ce (no validation before a resume added it): the epochs decide.
    _save(run / "c0" / CHECKPOINT_FILE, 0, {"epoch": "0", "val_ce": "0.5"})
    assert find_checkpoint(run) == run / "c3" / CHECKPOINT_FILE


def test_a_val_ce_tie_goes_to_the_later_epoch(tmp_path):
    run = tmp_path / "run"
    for epoch, val_ce in ((2, "1.0"), (5, "1.0"), (7, "1.5")):
        _save(run / f"c{epoch}" / CHECKPOINT_FILE, epoch, {"epoch": str(epoch), "val_ce": val_ce})
    assert find_checkpoint(run) == run / "c5" / CHECKPOINT_FILE


def test_ambiguous_folders_are_errors_that_list_the_candidates(tmp_path):
    two_runs = tmp_path / "two-runs"
    _save(two_runs / "a" / CHECKPOINT_FILE, 0, {"epoch": "1", "val_ce": "2.0"})
    _save(two_runs / "b" / CHECKPOINT_FILE, 1, {"epoch": "1", "val_ce": "1.0"}, **{"model.num_latent_vectors": 2})
    with pytest.raises(CheckpointSourceError, match=r"several checkpoints .*a/model.safetensors.*differently"):
        find_checkpoint(two_runs)

    no_epoch = tmp_path / "no-epoch"
    _save(no_epoch / "a" / CHECKPOINT_FILE, 0)
    _save(no_epoch / "b" / CHECKPOINT_FILE, 1)
    with pytest.raises(CheckpointSourceError, match="no epoch recorded"):
        find_checkpoint(no_epoch)

    tie = tmp_path / "tie"
    _save(tie / "a" / CHECKPOINT_FILE, 0, {"epoch": "2"})
    _save(tie / "b" / CHECKPOINT_FILE, 1, {"epoch": "2"})
    with pytest.raises(CheckpointSourceError, match="a tie at epoch 2"):
        find_checkpoint(tie)


def test_local_path_errors(tmp_path):
    with pytest.raises(CheckpointSourceError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointSourceError, match=f"no {CHECKPOINT_FILE} under"):
        resolve_checkpoint(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointSourceError, match="not a .safetensors checkpoint"):
        resolve_checkpoint(str(tmp_path / "notes.txt"))
    with pytest.raises(CheckpointSourceError, match="no model source"):
        resolve_checkpoint("  ")


def test_models_uri_uses_the_given_store_not_process_wide_uris(tmp_path, monkeypatch, mlflow_store):
    """MLflow's own models:/ download reads the global registry URI; resolution must not."""
    store = mlflow_store(tmp_path / "store.db")
    fingerprint = _save(tmp_path / "ckpt" / CHECKPOINT_FILE, 5)
    client = MlflowClient(store, registry_uri=store)
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.log_artifact(run_id, str(tmp_path / "ckpt" / CHECKPOINT_FILE), artifact_path="model")
    client.create_registered_model("m")
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    client.create_model_version("m", source, run_id=run_id)
    client.set_registered_model_alias("m", "champion", "1")

    elsewhere = mlflow_store(tmp_path / "elsewhere.db")  # an empty store named by the environment
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    for uri in ("models:/m@champion", "models:/m/1", "models:/m", f"runs:/{run_id}/model"):
        resolved = resolve_checkpoint(uri, tracking_uri=store)
        try:
            assert load_model(resolved.path).fingerprint == fingerprint, uri
            assert resolved.download_dir is not None and resolved.path.is_relative_to(resolved.download_dir)
        finally:
            resolved.release()
        assert not resolved.download_dir.exists()
    assert resolve_checkpoint("models:/m@champion", tracking_uri=store).version == "1"
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before

    with pytest.raises(CheckpointSourceError, match="could not resolve models:/m@nope"):
        resolve_checkpoint("models:/m@nope", tracking_uri=store)
    # Without an argument the environment's store is the one asked (and it has no such model).
    with pytest.raises(CheckpointSourceError, match=f"in {elsewhere}"):
        resolve_checkpoint("models:/m@champion")


def test_default_store_is_the_absolute_sqlite_file_in_the_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert resolve_tracking_uri(None) == resolve_tracking_uri("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel/x.db")
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'rel' / 'x.db'}"
    assert resolve_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"
