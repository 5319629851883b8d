"""Prepared data and run storage as URIs: file:// through the real readers, a filesystem that is not the local one
(a SubTreeFileSystem, fsspec's in-memory filesystem), and clear errors before Ray starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.fs
import pytest
import torch

from jobs import train
from jobs.dataset import (
    DataError,
    build_train_dataset,
    dataset_sizes,
    epoch_clock,
    load_eval_split,
    load_split,
    plan_training,
    split_exists,
)
from jobs.storage import Location, StorageError, resolve, storage_uri
from model.config import load_config

SHAPES_CFG = ["--model.image_size=32", "--model.max_seq_length=48"]


def test_resolve_local_paths_and_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = resolve("runs")
    assert isinstance(local.fs, pyarrow.fs.LocalFileSystem) and local.path == local.uri == str(tmp_path / "runs")
    uri = resolve(f"{tmp_path.as_uri()}/data/")
    assert uri.is_local and uri.path == str(tmp_path / "data") and uri.uri == f"{tmp_path.as_uri()}/data"
    assert (uri / "train").path == str(tmp_path / "data" / "train") and (uri / "train").uri.startswith("file://")
    assert storage_uri("runs") == str(tmp_path / "runs") and storage_uri(tmp_path.as_uri()) == tmp_path.as_uri()
    with pytest.raises(StorageError, match=r"cannot open 'foo://bucket/x': Unrecognized filesystem.*s3://, gs://"):
        resolve("foo://bucket/x")


def test_unsupported_scheme_and_missing_folder_fail_before_ray(prepared_shapes, tmp_path, monkeypatch, capsys):
    def no_ray(cfg):
        raise AssertionError("Ray was started for a job that could not run")

    monkeypatch.setattr(train, "start_ray", no_ray)
    args = ["--preset", "debug", "--tracking.enabled=false"]
    assert train.main([*args, "--data", "foo://bucket/coco"]) == 2
    assert "train: error: cannot open 'foo://bucket/coco': Unrecognized filesystem" in capsys.readouterr().err
    assert train.main([*args, "--data", (tmp_path / "nowhere").as_uri()]) == 2
    assert f"prepared data folder {(tmp_path / 'nowhere').as_uri()} does not exist" in capsys.readouterr().err
    assert train.main([*args, "--data", prepared_shapes.as_uri(), "--storage", "foo://bucket/runs"]) == 2
    assert "cannot open 'foo://bucket/runs'" in capsys.readouterr().err
    with pytest.raises(DataError, match="cannot open 'foo://x'"):
        split_exists("foo://x", "val")


def _memory_copy(folder: Path) -> Location:
    """The prepared folder copied into fsspec's in-memory filesystem: no local path reaches the readers."""
    from fsspec.implementations.memory import MemoryFileSystem
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    memory = MemoryFileSystem()
    if memory.exists("/vljepa-test"):  # fsspec's memory store is process-wide
        memory.rm("/vljepa-test", recursive=True)
    fs = PyFileSystem(FSSpecHandler(memory))
    pyarrow.fs.copy_files(
        str(folder), "/vljepa-test/prepared", source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs
    )
    return Location(fs, "/vljepa-test/prepared", "memory://vljepa-test/prepared")


@pytest.mark.ray  # only for the session's prepared folder: nothing here runs on Ray
def test_plain_readers_through_uri_and_memory_filesystems(prepared_shapes):
    pytest.importorskip("fsspec")
    cfg = load_config("shapes", [*SHAPES_CFG, "--data.val_split=missing", "--data.val_fraction=0.2"])
    local = plan_training(prepared_shapes, cfg)
    reference = load_eval_split(prepared_shapes, cfg)
    for where in (prepared_shapes.as_uri(), _memory_copy(prepared_shapes)):
        plan = plan_training(where, cfg)
        assert (plan.n_train, plan.n_val, plan.rows.max_id) == (local.n_train, local.n_val, local.rows.max_id)
        assert [Path(f).name for f in plan.rows.files] == [Path(f).name for f in local.rows.files]
        assert dataset_sizes(where, cfg) == (local.n_train, local.n_val)
        held = load_eval_split(where, cfg)
        assert held.image_ids == reference.image_ids and torch.equal(held.images, reference.images)
        assert (
            load_split(where, "val", 32, limit=5).captions == load_split(prepared_shapes, "val", 32, limit=5).captions
        )
        assert split_exists(where, "val") and not split_exists(where, "test")
    memory = _memory_copy(prepared_shapes)
    memory.fs.delete_file(f"{memory.path}/train/part-00001.parquet")
    with pytest.raises(DataError, match=r"memory://vljepa-test/prepared/train is incomplete: shard\(s\) part-00001"):
        plan_training(memory, cfg)


@pytest.mark.ray
def test_train_dataset_reads_through_another_filesystem(ray_local, prepared_shapes):
    """Ray Data's read tasks open the shards through the Location's own filesystem (pickled to every task)."""
    cfg = load_config("shapes", [*SHAPES_CFG, "--data.ingest=stream"])
    parent = pyarrow.fs.SubTreeFileSystem(str(prepared_shapes.parent), pyarrow.fs.LocalFileSystem())
    subtree = Location(parent, prepared_shapes.name, f"subtree://{prepared_shapes.name}")
    clock = epoch_clock()
    try:
        rows = {}
        for name, where in (("local", prepared_shapes), ("subtree", subtree)):
            batches = list(build_train_dataset(where, cfg, clock=clock).iter_batches(batch_size=64))
            rows[name] = {k: np.concatenate([b[k] for b in batches]) for k in ("image_id", "caption_ids", "images")}
    finally:
        import ray

        ray.kill(clock)
    assert len(rows["subtree"]["image_id"]) == 180
    for key in rows["local"]:
        np.testing.assert_array_equal(rows["subtree"][key], rows["local"][key])


def test_prepare_writes_local_folders_and_names_the_copy_step(tmp_path, monkeypatch, capsys):
    from jobs import prepare

    monkeypatch.chdir(tmp_path)
    argv = ["--coco-root", str(tmp_path / "coco"), "--split", "train"]
    assert prepare.main([*argv, "--out", "s3://bucket/coco-prepared"]) == 2
    assert "prepare writes a local or mounted folder" in capsys.readouterr().err
    assert not (tmp_path / "s3:").exists()  # the URI is not taken for a relative local path
