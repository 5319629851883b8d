"""Locating prepared splits and planning which of their rows a dataset reads (see jobs/prepare.py for the layout).

    ROOT/<cfg.data.train_split>/part-*.parquet + manifest.json
    ROOT/<cfg.data.val_split>/...      optional: without it, cfg.data.val_fraction of the train images
                                       (chosen by a fixed hash of image_id) is held out as validation

ROOT is a local folder or a URI (file://, s3://, gs://: jobs/storage.py), read through its pyarrow filesystem.
Everything here runs on the driver before Ray starts and only reads manifests and the image_id column,
so a missing or incomplete folder fails with a DataError that names it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow.fs
import pyarrow.parquet as pq

from jobs.manifest import MANIFEST, SCHEMA_VERSION  # the layout jobs/prepare.py writes
from jobs.storage import Location, StorageError, Where, resolve
from model.config import Config


class DataError(StorageError):
    """A prepared folder that cannot be read: missing, incomplete or from an incompatible schema."""


def locate(where: Where) -> Location:
    """The prepared folder's filesystem and path (DataError for a URI no pyarrow filesystem opens)."""
    try:
        return resolve(where)
    except StorageError as exc:
        raise DataError(str(exc)) from None


def read_manifest(split_dir: Where) -> dict:
    """The manifest of one prepared split, after checking that it is complete and readable."""
    split = locate(split_dir)
    if not split.is_dir():
        raise DataError(f"prepared split folder {split} does not exist (run `python -m jobs.prepare` first)")
    listing = split.listing()  # one call: on an object store every shard check would be a request
    if listing.get(MANIFEST) != pyarrow.fs.FileType.File:
        raise DataError(f"{split} has no {MANIFEST}: it is not a prepared split, or its prepare run did not finish")
    try:
        manifest = json.loads((split / MANIFEST).read_bytes())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {split / MANIFEST}: {exc}") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise DataError(
            f"{split / MANIFEST} has schema_version {version!r}; this code reads {SCHEMA_VERSION} (re-run prepare)"
        )
    missing = [s["name"] for s in manifest["shards"] if listing.get(s["name"]) != pyarrow.fs.FileType.File]
    if missing:
        raise DataError(f"{split} is incomplete: shard(s) {', '.join(missing)} listed in {MANIFEST} are missing")
    return manifest


def shard_locations(split_dir: Where) -> list[Location]:
    """A split's shards, in manifest (= image id) order."""
    split = locate(split_dir)
    return [split / s["name"] for s in read_manifest(split)["shards"]]


def shard_paths(split_dir: Where) -> list[str]:
    """The shards' paths inside their filesystem (absolute local paths for a local folder), in id order."""
    return [loc.path for loc in shard_locations(split_dir)]


def split_exists(data_dir: Where, split: str) -> bool:
    """Whether ROOT/<split> is a folder (prepared or not: read_manifest says which)."""
    return (locate(data_dir) / split).is_dir()


def resolve_splits(data_dir: Where, cfg: Config) -> tuple[Location, Location | None]:
    """(train folder, validation folder or None) for a prepared root.

    Without a ROOT/<val_split> folder, the validation folder is the train folder itself and the
    `cfg.data.val_fraction` held-out rows (`heldout_mask`) are the validation set; the train
    dataset then leaves them out. None only when there is no val split and val_fraction is 0.
    """
    root = locate(data_dir)
    if not root.is_dir():
        raise DataError(f"prepared data folder {root} does not exist")
    train = root / cfg.data.train_split
    if not train.is_dir():
        found = sorted(n for n, t in root.listing().items() if t == pyarrow.fs.FileType.Directory)
        found = [n for n in found if (root / n / MANIFEST).is_file()]
        raise DataError(
            f"no split {cfg.data.train_split!r} in {root} (prepared splits there: {', '.join(found) or 'none'}); "
            f"set --data.train_split"
        )
    read_manifest(train)
    val = root / cfg.data.val_split
    if val.path != train.path and val.is_dir():
        read_manifest(val)
        return train, val
    return train, (train if cfg.data.val_fraction > 0 else None)


def holdout(data_dir: Where, cfg: Config) -> tuple[Location, Location | None, float]:
    """resolve_splits plus the held-out fraction in force (0 when a separate val split exists)."""
    train, val = resolve_splits(data_dir, cfg)
    return train, val, (cfg.data.val_fraction if val == train else 0.0)


def heldout_mask(image_ids: np.ndarray, fraction: float) -> np.ndarray:
    """True for the images held out as validation: a fixed hash of the id, so stable across runs and machines."""
    x = np.asarray(image_ids, dtype=np.int64).astype(np.uint64)
    # splitmix64 finaliser: consecutive ids map to well-spread 64-bit values
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


@dataclass(frozen=True)
class RowPlan:
    """Which rows of a split a dataset reads: shard files, the hold-out rule and an id ceiling for the cap."""

    files: list[str]  # paths inside `fs`
    fraction: float  # held-out fraction (0 = none)
    keep_heldout: bool  # True: the held-out rows (validation); False: the rest (training)
    max_id: int  # rows with a larger image_id are dropped (num_samples cap); -1 = no rows
    rows: int  # exactly how many rows the dataset yields per epoch
    fs: pyarrow.fs.FileSystem | None = None  # the shards' filesystem (None: the local one)


def plan_rows(split_dir: Where, fraction: float, keep_heldout: bool, cap: int = 0) -> RowPlan:
    """Decide the rows on the driver from the image_id column alone, so every epoch reads the same set.

    The cap keeps the first `cap` eligible images by id (not "whatever streams in first").
    """
    split = locate(split_dir)
    files, ids_per_file = [], []
    for shard in shard_locations(split):
        ids = pq.read_table(shard.path, columns=["image_id"], filesystem=shard.fs)["image_id"].to_numpy()
        if fraction > 0:
            ids = ids[heldout_mask(ids, fraction) == keep_heldout]
        files.append(shard.path)
        ids_per_file.append(ids)
    all_ids = np.concatenate(ids_per_file) if ids_per_file else np.zeros(0, dtype=np.int64)
    if cap > 0:
        all_ids = all_ids[:cap]  # shards are sorted by id, so this is the lowest ids
    if len(all_ids) == 0:
        return RowPlan([], fraction, keep_heldout, -1, 0, split.fs)
    max_id = int(all_ids[-1])
    needed = [f for f, ids in zip(files, ids_per_file, strict=True) if len(ids) and ids[0] <= max_id]
    return RowPlan(needed, fraction, keep_heldout, max_id, len(all_ids), split.fs)


def dataset_sizes(data_dir: Where, cfg: Config) -> tuple[int, int]:
    """(training rows per epoch, validation images) exactly as the datasets will yield them."""
    train, val, fraction = holdout(data_dir, cfg)
    n_train = plan_rows(train, fraction, False, cfg.data.num_samples).rows
    n_val = 0 if val is None else plan_rows(val, fraction, True).rows
    return n_train, n_val


@dataclass(frozen=True)
class DataPlan:
    """What the training driver learns from a prepared folder, reading it once (see `plan_training`)."""

    train_dir: Location
    val_dir: Location | None
    fraction: float  # held-out share of train in force (0 with a separate val split)
    rows: RowPlan  # the training rows
    n_val: int  # validation images

    @property
    def n_train(self) -> int:
        return self.rows.rows


def plan_training(data_dir: Where, cfg: Config) -> DataPlan:
    """Check the folder, its manifests, the splits and the categories, and plan the training rows: one read of
    each manifest and of each shard's image ids (DataError naming the problem otherwise)."""
    train, val, fraction = holdout(data_dir, cfg)
    _check_split_categories(train, cfg)
    rows = plan_rows(train, fraction, keep_heldout=False, cap=cfg.data.num_samples)
    n_val = 0 if val is None else plan_rows(val, fraction, keep_heldout=True).rows
    return DataPlan(train, val, fraction, rows, n_val)


def check_categories(data_dir: Where, cfg: Config) -> None:
    """With objective.category_weight > 0: the training split has instance categories that fit the head."""
    if cfg.objective.category_weight <= 0:
        return
    _check_split_categories(holdout(data_dir, cfg)[0], cfg)


def _check_split_categories(train: Location, cfg: Config) -> None:
    if cfg.objective.category_weight <= 0:
        return
    ids = [int(c["id"]) for c in read_manifest(train).get("categories") or []]
    if not ids:
        raise DataError(
            f"objective.category_weight={cfg.objective.category_weight} needs instance categories, but {train} "
            "was prepared without instances_<split>.json"
        )
    if max(ids) >= cfg.objective.num_categories or min(ids) < 0:
        raise DataError(
            f"{train} has category ids {min(ids)}..{max(ids)}: objective.num_categories="
            f"{cfg.objective.num_categories} must be at least {max(ids) + 1}"
        )
