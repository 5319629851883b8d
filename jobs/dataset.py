"""Training and evaluation input from a prepared folder (see jobs/prepare.py for the layout).

    ROOT/<cfg.data.train_split>/part-*.parquet + manifest.json
    ROOT/<cfg.data.val_split>/...      optional: without it, cfg.data.val_fraction of the train images
                                       (chosen by a fixed hash of image_id) is held out as validation

Ray Data path (training, inside Ray Train):

    build_train_dataset(root, cfg)      read -> per-epoch shuffle -> map_batches on CPU (data.ingest=materialize:
                                        the decoded pixels are materialised once and only this map reruns):
                                        one random caption per image per epoch, decode, resize, normalise,
                                        tokenise -> {"images" (3, S, S) float32, "caption_ids" (T,) int64,
                                        "caption_mask" (T,) bool, "image_id" int64}, T = model.max_seq_length,
                                        + "categories" (C,) float32 multi-hot with objective.category_weight > 0
    build_eval_dataset(root, cfg)       every caption of each validation image: "caption_ids" (R, T), ...
    torch_batches(shard, batch, cfg)    the worker side: get_dataset_shard("train") -> dicts of tensors

Plain path (evaluation, serving demos; pyarrow only): load_split / load_eval_split -> EvalSet.

Shuffling, measured by `python -m benchmarks.data` (figures in benchmarks/RESULTS.md): `data.shuffle=file`
reseeds the shard order every epoch and streams with no barrier; `block` (randomize_block_order) is an
all-to-all step that reads every shard before the first batch; Ray's local shuffle buffer adds latency and
copies. Both modes also permute the rows inside each map batch, which is free. `none`: fixed order.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq
import torch

from jobs.manifest import MANIFEST, SCHEMA_VERSION  # the layout jobs/prepare.py writes
from model.config import Config
from model.tokenizer import PAD, ByteTokenizer
from model.transform import normalize_uint8, open_image, resize_center_crop, to_tensor

if TYPE_CHECKING:
    import ray.data

MAP_BATCH_ROWS = 256  # rows per map_batches call: big enough to amortise the call, small enough to stream


class DataError(Exception):
    """A prepared folder that cannot be read: missing, incomplete or from an incompatible schema."""


# ---------------------------------------------------------------------------
# Locating splits


def read_manifest(split_dir: str | Path) -> dict:
    """The manifest of one prepared split, after checking that it is complete and readable."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataError(f"prepared split folder {split_dir} does not exist (run `python -m jobs.prepare` first)")
    path = split_dir / MANIFEST
    if not path.is_file():
        raise DataError(f"{split_dir} has no {MANIFEST}: it is not a prepared split, or its prepare run did not finish")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise DataError(f"{path} has schema_version {version!r}; this code reads {SCHEMA_VERSION} (re-run prepare)")
    missing = [s["name"] for s in manifest["shards"] if not (split_dir / s["name"]).is_file()]
    if missing:
        raise DataError(f"{split_dir} is incomplete: shard(s) {', '.join(missing)} listed in {MANIFEST} are missing")
    return manifest


def shard_paths(split_dir: str | Path) -> list[str]:
    """Absolute paths of a split's shards, in manifest (= image id) order."""
    split_dir = Path(split_dir).resolve()
    return [str(split_dir / s["name"]) for s in read_manifest(split_dir)["shards"]]


def resolve_splits(data_dir: str | Path, cfg: Config) -> tuple[Path, Path | None]:
    """(train folder, validation folder or None) for a prepared root.

    Without a ROOT/<val_split> folder, the validation folder is the train folder itself and the
    `cfg.data.val_fraction` held-out rows (`heldout_mask`) are the validation set; the train
    dataset then leaves them out. None only when there is no val split and val_fraction is 0.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"prepared data folder {root} does not exist")
    train = root / cfg.data.train_split
    if not train.is_dir():
        found = sorted(p.name for p in root.iterdir() if (p / MANIFEST).is_file())
        raise DataError(
            f"no split {cfg.data.train_split!r} in {root} (prepared splits there: {', '.join(found) or 'none'}); "
            f"set --data.train_split"
        )
    read_manifest(train)
    val = root / cfg.data.val_split
    if val.is_dir() and val != train:
        read_manifest(val)
        return train, val
    return train, (train if cfg.data.val_fraction > 0 else None)


def _holdout(data_dir: str | Path, cfg: Config) -> tuple[Path, Path | None, float]:
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

    files: list[str]
    fraction: float  # held-out fraction (0 = none)
    keep_heldout: bool  # True: the held-out rows (validation); False: the rest (training)
    max_id: int  # rows with a larger image_id are dropped (num_samples cap); -1 = no rows
    rows: int  # exactly how many rows the dataset yields per epoch


def plan_rows(split_dir: Path, fraction: float, keep_heldout: bool, cap: int = 0) -> RowPlan:
    """Decide the rows on the driver from the image_id column alone, so every epoch reads the same set.

    The cap keeps the first `cap` eligible images by id (not "whatever streams in first").
    """
    files, ids_per_file = [], []
    for path in shard_paths(split_dir):
        ids = pq.read_table(path, columns=["image_id"])["image_id"].to_numpy()
        if fraction > 0:
            ids = ids[heldout_mask(ids, fraction) == keep_heldout]
        files.append(path)
        ids_per_file.append(ids)
    all_ids = np.concatenate(ids_per_file) if ids_per_file else np.zeros(0, dtype=np.int64)
    if cap > 0:
        all_ids = all_ids[:cap]  # shards are sorted by id, so this is the lowest ids
    if len(all_ids) == 0:
        return RowPlan([], fraction, keep_heldout, -1, 0)
    max_id = int(all_ids[-1])
    needed = [f for f, ids in zip(files, ids_per_file, strict=True) if len(ids) and ids[0] <= max_id]
    return RowPlan(needed, fraction, keep_heldout, max_id, len(all_ids))


def dataset_sizes(data_dir: str | Path, cfg: Config) -> tuple[int, int]:
    """(training rows per epoch, validation images) exactly as the datasets will yield them."""
    train, val, fraction = _holdout(data_dir, cfg)
    n_train = plan_rows(train, fraction, False, cfg.data.num_samples).rows
    n_val = 0 if val is None else plan_rows(val, fraction, True).rows
    return n_train, n_val


@dataclass(frozen=True)
class DataPlan:
    """What the training driver learns from a prepared folder, reading it once (see `plan_training`)."""

    train_dir: Path
    val_dir: Path | None
    fraction: float  # held-out share of train in force (0 with a separate val split)
    rows: RowPlan  # the training rows
    n_val: int  # validation images

    @property
    def n_train(self) -> int:
        return self.rows.rows


def plan_training(data_dir: str | Path, cfg: Config) -> DataPlan:
    """Check the folder, its manifests, the splits and the categories, and plan the training rows: one read of
    each manifest and of each shard's image ids (DataError naming the problem otherwise)."""
    train, val, fraction = _holdout(Path(data_dir).resolve(), cfg)
    _check_split_categories(train, cfg)
    rows = plan_rows(train, fraction, keep_heldout=False, cap=cfg.data.num_samples)
    n_val = 0 if val is None else plan_rows(val, fraction, keep_heldout=True).rows
    return DataPlan(train, val, fraction, rows, n_val)


# ---------------------------------------------------------------------------
# Ray Data: training and validation datasets


def build_train_dataset(
    data_dir: str | Path, cfg: Config, *, clock: Any = None, plan: DataPlan | None = None
) -> ray.data.Dataset:
    """Training dataset; every epoch reorders the shards, permutes rows and redraws one caption per image.

    All of it is seeded by (train.seed, epoch), the epoch read from `clock` (an `EpochClock` actor that the
    training loop sets; a new one at epoch 1 when None), and rows arrive in a deterministic order
    (`preserve_order`), so the same config and seed give the same batches, after a resume too.
    `plan`: the driver's `plan_training` result, so the shards' ids are not read again.

    `data.ingest` (see `choose_ingest`): "stream" reads and decodes the shards in every epoch;
    "materialize" decodes them once into the object store and each epoch only reshuffles, draws
    captions and tokenises; "auto" materialises when the decoded rows fit.
    """
    plan = plan or plan_training(data_dir, cfg)
    if plan.rows.rows == 0:
        raise DataError(
            f"no training rows in {plan.train_dir} (held-out fraction {plan.fraction}, "
            f"num_samples {cfg.data.num_samples})"
        )
    clock = clock if clock is not None else epoch_clock()
    draw = _Draw(seed=cfg.train.seed, clock=clock)
    file_shuffle, block_seed = _epoch_seeded()
    seed = block_seed(seed=cfg.train.seed, reseed_after_execution=True, clock=clock)
    shuffle_files = file_shuffle(seed=cfg.train.seed, clock=clock) if cfg.data.shuffle == "file" else None
    columns = ["category_ids"] if cfg.objective.category_weight > 0 else []
    ds = _read_shards(plan.rows.files, shuffle_files, cfg.data.num_cpus_per_map, columns)
    ds.context.execution_options.preserve_order = True  # this dataset's context copy: a deterministic row order
    if choose_ingest(cfg, plan.rows.rows) == "materialize":
        return _materialized_train_dataset(ds, plan.rows, cfg, seed, draw)
    if cfg.data.shuffle == "block":
        ds = ds.randomize_block_order(seed=seed)
    return ds.map_batches(
        _train_batch,
        fn_kwargs={
            "plan": plan.rows,
            "cfg": _MapConfig.from_config(cfg),
            "permute": cfg.data.shuffle != "none",
            "draw": draw,
        },
        batch_size=MAP_BATCH_ROWS,
        batch_format="numpy",
        num_cpus=cfg.data.num_cpus_per_map,
        zero_copy_batch=True,
    )


def build_eval_dataset(data_dir: str | Path, cfg: Config, *, limit: int = 0) -> ray.data.Dataset | None:
    """Validation images in id order, each with every caption: "caption_ids"/"caption_mask" are (R, T).

    R = the most captions any image of the split has; rows beyond an image's "num_captions" are all PAD
    with an all-False mask. None when the config has no validation data.
    """
    _train, val, fraction = _holdout(data_dir, cfg)
    if val is None:
        return None
    plan = plan_rows(val, fraction, keep_heldout=True, cap=limit)
    if plan.rows == 0:
        return None
    refs = int(read_manifest(val)["max_captions_per_image"])
    ds = _read_shards(plan.files, None, cfg.data.num_cpus_per_map)
    ds.context.execution_options.preserve_order = True  # this dataset's own context copy: rows in id order
    return ds.map_batches(
        _eval_batch,
        fn_kwargs={"plan": plan, "cfg": _MapConfig.from_config(cfg), "refs": refs},
        batch_size=MAP_BATCH_ROWS,
        batch_format="numpy",
        num_cpus=cfg.data.num_cpus_per_map,
        zero_copy_batch=True,
    )


# ---------------------------------------------------------------------------
# Materialised ingest (data.ingest): decode once, reshuffle and redraw captions every epoch

OBJECT_STORE_SHARE = 0.5  # "auto" materialises when the decoded rows take at most this share of the free store
CAPTION_BYTES_PER_ROW = 1024  # the captions list and ids of a row (COCO: 5 captions of ~55 characters)


def decoded_nbytes(cfg: Config, rows: int) -> int:
    """Object-store bytes of the decoded training rows: uint8 pixels (S, S, 3) plus captions, per row."""
    return rows * (cfg.model.image_size**2 * 3 + CAPTION_BYTES_PER_ROW)


def choose_ingest(cfg: Config, rows: int, free_bytes: float | None = None) -> str:
    """ "materialize" or "stream" for `data.ingest`; "auto" compares the decoded size with the free object store.

    A streaming dataset re-executes read + decode every epoch (~0.5 s before the first batch at the seed
    config, and the decode cost again); a materialised one keeps the decoded uint8 pixels in the object
    store, as Ray's guide recommends for data that fits, so an epoch only shuffles and tokenises.
    """
    if cfg.data.ingest != "auto":
        return cfg.data.ingest
    if free_bytes is None:
        import ray

        # Without a running Ray there is no store to measure (and no cluster to join on purpose here).
        free_bytes = ray.available_resources().get("object_store_memory", 0.0) if ray.is_initialized() else 0.0
    return "materialize" if decoded_nbytes(cfg, rows) <= OBJECT_STORE_SHARE * free_bytes else "stream"


def _materialized_train_dataset(
    ds: ray.data.Dataset, plan: RowPlan, cfg: Config, seed: Any, draw: _Draw
) -> ray.data.Dataset:
    """Decode the selected rows once (blocking, into the object store); per epoch: block order, rows, captions."""
    map_cfg = _MapConfig.from_config(cfg)
    decoded = ds.map_batches(
        _decode_rows,
        fn_kwargs={"plan": plan, "cfg": map_cfg},
        batch_size=MAP_BATCH_ROWS,
        batch_format="numpy",
        num_cpus=cfg.data.num_cpus_per_map,
        zero_copy_batch=True,
    ).materialize()
    if cfg.data.shuffle != "none":
        # On materialised blocks this only permutes references: the per-epoch counterpart of the file shuffle.
        decoded = decoded.randomize_block_order(seed=seed)
    # The streaming path's own map: it finds "pixels" instead of "image" and skips the decode.
    return decoded.map_batches(
        _train_batch,
        fn_kwargs={"plan": plan, "cfg": map_cfg, "permute": cfg.data.shuffle != "none", "draw": draw},
        batch_size=MAP_BATCH_ROWS,
        batch_format="numpy",
        num_cpus=cfg.data.num_cpus_per_map,
        zero_copy_batch=True,
    )


def _decode_rows(batch: dict[str, np.ndarray], *, plan: RowPlan, cfg: _MapConfig) -> dict[str, Any]:
    """Once: the rows this dataset keeps, images decoded to uint8 (B, S, S, 3), captions left as lists."""
    rows = _select(batch, plan)
    out = {
        "image_id": batch["image_id"][rows].astype(np.int64),
        "pixels": decode_pixels([batch["image"][i] for i in rows], cfg.image_size),
        "captions": [list(batch["captions"][i]) for i in rows],
    }
    if cfg.num_categories:
        out["category_ids"] = [list(batch["category_ids"][i]) for i in rows]
    return out


# ---------------------------------------------------------------------------


def _read_shards(files: list[str], shuffle: Any, num_cpus: float, extra: list[str] | None = None) -> ray.data.Dataset:
    """One block per shard, only the columns training needs.

    Read tasks ask for `num_cpus` like the decode tasks: at Ray's default of 1 CPU they could never
    start under a data budget below one CPU (a sweep trial's cap), and the trial would hang.

    Uses Ray's file-based Parquet reader: the default DataSource V2 path starts 32 footer-reader
    actors on every execution (every epoch), which took ~20 s per epoch on a 2-core machine against
    ~0.3 s here (see benchmarks/RESULTS.md).
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    previous, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(files, shuffle=shuffle, override_num_blocks=len(files), num_cpus=num_cpus)
    finally:
        ctx.use_datasource_v2 = previous
    return ds.select_columns(["image_id", "image", "captions", *(extra or [])])


def torch_batches(shard: Any, batch_size: int, cfg: Config, *, device: Any = "auto"):
    """Worker side: `torch_batches(ray.train.get_dataset_shard("train"), per_worker_batch, cfg)` -> dicts of tensors."""
    return shard.iter_torch_batches(batch_size=batch_size, prefetch_batches=cfg.data.prefetch_batches, device=device)


class EpochClock:
    """The epoch the training loop is in, for the Ray Data code that orders shards and draws captions.

    Rank 0 sets it before it starts iterating an epoch. Ray Data starts an epoch of a split dataset only when
    every worker has asked for it, so each read plan and map task of that epoch reads the new value. A resumed
    run sets the epoch it resumes at, and so sees the data the uninterrupted run saw.
    """

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def set(self, epoch: int) -> None:
        self.epoch = epoch

    def get(self) -> int:
        return self.epoch


def epoch_clock(epoch: int = 1) -> Any:
    """A new `EpochClock` actor (no CPU reserved) on the caller's node; `ray.kill` it when the run is over.

    Pinned to the driver's node: placed on a worker node, the clock died with that node and the restarted
    workers of a run that lost a node could never read their epoch again (found by tests/cluster).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, scheduling_strategy=here)(EpochClock).remote(epoch)


@dataclass(frozen=True)
class _Draw:
    """Seed of the per-epoch random choices made in map tasks, and the clock that says which epoch it is."""

    seed: int
    clock: Any  # EpochClock actor handle, or the epoch itself (an int) outside Ray (benchmarks.run0)

    def epoch(self) -> int:
        if isinstance(self.clock, int):
            return self.clock
        import ray

        return int(ray.get(self.clock.get.remote()))


@functools.cache
def _epoch_seeded() -> tuple[type, type]:
    """(file shuffle, block shuffle) configs seeded by (train.seed, the clock's epoch) instead of Ray's
    per-execution counter, which restarts at 0 when a worker group restarts or a run resumes. Defined on
    first use, so that importing this module does not import ray.data."""
    import ray.data

    @dataclass
    class EpochFileShuffle(ray.data.FileShuffleConfig):
        clock: Any = None

        def get_seed(self, execution_idx: int = 0) -> int | None:
            epoch = _Draw(self.seed, self.clock).epoch()
            return int(np.random.SeedSequence([self.seed % 2**63, epoch]).generate_state(1)[0])

    @dataclass
    class EpochBlockSeed(ray.data.RandomSeedConfig):
        clock: Any = None

        def get_seed_tuple(self, *, data_context: Any) -> Any:
            seed = super().get_seed_tuple(data_context=data_context)  # (seed, Ray's execution index)
            return dataclasses.replace(seed, execution_idx=_Draw(self.seed, self.clock).epoch())

    return EpochFileShuffle, EpochBlockSeed


@dataclass(frozen=True)
class _MapConfig:
    """The few config values the map tasks need (small to ship with every task)."""

    image_size: int
    max_seq_length: int
    max_caption_chars: int
    num_categories: int  # 0: no "categories" column

    @classmethod
    def from_config(cls, cfg: Config) -> _MapConfig:
        categories = cfg.objective.num_categories if cfg.objective.category_weight > 0 else 0
        return cls(cfg.model.image_size, cfg.model.max_seq_length, cfg.data.max_caption_chars, categories)


def _select(batch: dict[str, np.ndarray], plan: RowPlan) -> np.ndarray:
    """Indices of the batch rows this dataset keeps (hold-out rule and id ceiling)."""
    ids = batch["image_id"]
    keep = ids <= plan.max_id
    if plan.fraction > 0:
        keep &= heldout_mask(ids, plan.fraction) == plan.keep_heldout
    return np.flatnonzero(keep)


def _train_batch(
    batch: dict[str, np.ndarray], *, plan: RowPlan, cfg: _MapConfig, permute: bool, draw: _Draw
) -> dict[str, np.ndarray]:
    """Runs in a Ray Data task: pick rows, draw a caption each, decode images (or take the materialised
    path's decoded "pixels"), tokenise."""
    rows = _select(batch, plan)
    # Seeded by (train.seed, epoch, first image id of the batch): the caption draw and row order change
    # every epoch and are the same in every run of this config, whichever task runs the batch.
    first_id = int(batch["image_id"][0]) if len(batch["image_id"]) else 0
    rng = np.random.default_rng([draw.seed % 2**63, draw.epoch(), first_id])
    if permute:
        rows = rng.permutation(rows)
    captions = [batch["captions"][i] for i in rows]
    drawn = [str(caps[rng.integers(len(caps))]) for caps in captions]
    ids, mask = encode_captions(drawn, cfg.max_seq_length, cfg.max_caption_chars)  # (B, T) each
    out = {
        "images": (
            normalize_uint8(batch["pixels"][rows])
            if "pixels" in batch
            else decode_images([batch["image"][i] for i in rows], cfg.image_size)
        ),  # (B, 3, S, S)
        "caption_ids": ids,
        "caption_mask": mask,
        "image_id": batch["image_id"][rows].astype(np.int64),
    }
    if cfg.num_categories:
        out["categories"] = multi_hot_categories([batch["category_ids"][i] for i in rows], cfg.num_categories)
    return out


def transform_train_batch(batch: dict[str, Any], cfg: Config, epoch: int) -> dict[str, np.ndarray]:
    """The training map transform outside Ray (benchmarks.run0): prepared rows {"image_id", "image" (stored
    bytes), "captions", "category_ids"} -> what a worker's batch holds, with epoch `epoch`'s row order and draws."""
    ids = np.asarray(batch["image_id"], dtype=np.int64)
    plan = RowPlan([], 0.0, False, int(ids.max()) if len(ids) else -1, len(ids))
    permute = cfg.data.shuffle != "none"
    return _train_batch(
        {**batch, "image_id": ids},
        plan=plan,
        cfg=_MapConfig.from_config(cfg),
        permute=permute,
        draw=_Draw(cfg.train.seed, epoch),
    )


def multi_hot_categories(category_ids: list[Any], num_categories: int) -> np.ndarray:
    """Per-image category id lists -> (B, C) float32 multi-hot; an id outside [0, C) is a DataError."""
    out = np.zeros((len(category_ids), num_categories), dtype=np.float32)
    for row, ids in enumerate(category_ids):
        ids = np.asarray(ids, dtype=np.int64)
        bad = ids[(ids < 0) | (ids >= num_categories)]
        if len(bad):
            raise DataError(f"category id {int(bad[0])} is outside objective.num_categories={num_categories}")
        out[row, ids] = 1.0
    return out


def check_categories(data_dir: str | Path, cfg: Config) -> None:
    """With objective.category_weight > 0: the training split has instance categories that fit the head."""
    if cfg.objective.category_weight <= 0:
        return
    _check_split_categories(_holdout(data_dir, cfg)[0], cfg)


def _check_split_categories(train: Path, cfg: Config) -> None:
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


def _eval_batch(batch: dict[str, np.ndarray], *, plan: RowPlan, cfg: _MapConfig, refs: int) -> dict[str, np.ndarray]:
    rows = _select(batch, plan)
    n, t = len(rows), cfg.max_seq_length
    ids = np.full((n, refs, t), PAD, dtype=np.int64)  # (B, R, T)
    mask = np.zeros((n, refs, t), dtype=bool)
    counts = np.zeros(n, dtype=np.int64)
    for j, i in enumerate(rows):
        caps = [str(c) for c in batch["captions"][i]][:refs]
        counts[j] = len(caps)
        ids[j, : len(caps)], mask[j, : len(caps)] = encode_captions(caps, t, cfg.max_caption_chars)
    return {
        "images": decode_images([batch["image"][i] for i in rows], cfg.image_size),
        "caption_ids": ids,
        "caption_mask": mask,
        "num_captions": counts,
        "image_id": batch["image_id"][rows].astype(np.int64),
    }


def encode_captions(texts: list[str], max_len: int, max_chars: int) -> tuple[np.ndarray, np.ndarray]:
    """Captions -> ids (B, T) int64 padded with PAD to exactly T = max_len, mask (B, T) bool."""
    tok = ByteTokenizer(max_len)
    ids = np.full((len(texts), max_len), PAD, dtype=np.int64)
    for row, text in enumerate(texts):
        seq = tok.encode(text[:max_chars])
        ids[row, : len(seq)] = seq
    return ids, ids != PAD


def decode_images(blobs: list[bytes], size: int) -> np.ndarray:
    """Stored image bytes -> (B, 3, S, S) float32, ImageNet-normalised (the model transform, batched)."""
    return normalize_uint8(decode_pixels(blobs, size))  # (B, H, W, 3) uint8 -> (B, 3, S, S)


def decode_pixels(blobs: list[bytes], size: int) -> np.ndarray:
    """Stored image bytes -> (B, S, S, 3) uint8, resized and centre-cropped: 4x smaller than normalised floats."""
    if not blobs:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    return np.stack([np.asarray(resize_center_crop(open_image(b, draft_size=size), size)) for b in blobs])


# ---------------------------------------------------------------------------
# Plain reader (no Ray): evaluation and serving demos


@dataclass
class EvalSet:
    """A whole split in memory: images (N, 3, S, S) with all their captions and category ids."""

    image_ids: list[int]
    images: torch.Tensor
    captions: list[list[str]]
    category_ids: list[list[int]]
    file_names: list[str]

    def __len__(self) -> int:
        return len(self.image_ids)


def load_split(
    data_dir: str | Path, split: str, image_size: int, *, limit: int = 0, heldout: tuple[float, bool] | None = None
) -> EvalSet:
    """Read ROOT/<split> with pyarrow and decode every image to (3, S, S); `limit` > 0 keeps the first N by id.

    `heldout=(fraction, keep_heldout)` applies the hold-out rule of `heldout_mask`.
    """
    split_dir = Path(data_dir) / split
    out = EvalSet([], torch.zeros(0, 3, image_size, image_size), [], [], [])
    images: list[torch.Tensor] = []
    for path in shard_paths(split_dir):
        table = pq.read_table(path)
        ids = table["image_id"].to_numpy()
        keep = np.ones(len(ids), dtype=bool)
        if heldout is not None and heldout[0] > 0:
            keep = heldout_mask(ids, heldout[0]) == heldout[1]
        cols = {name: table[name].to_pylist() for name in ("file_name", "captions", "category_ids", "image")}
        for i in np.flatnonzero(keep):
            if limit and len(out.image_ids) >= limit:
                break
            out.image_ids.append(int(ids[i]))
            out.file_names.append(cols["file_name"][i])
            out.captions.append(list(cols["captions"][i]))
            out.category_ids.append(list(cols["category_ids"][i]))
            images.append(
                to_tensor(resize_center_crop(open_image(cols["image"][i], draft_size=image_size), image_size))
            )
    if images:
        out.images = torch.stack(images)  # (N, 3, S, S)
    return out


def load_eval_split(data_dir: str | Path, cfg: Config, *, limit: int = 0) -> EvalSet | None:
    """The validation set of a config (val split, or the held-out part of train) at cfg.model.image_size."""
    train, val, fraction = _holdout(data_dir, cfg)
    if val is None:
        return None
    return load_split(
        val.parent, val.name, cfg.model.image_size, limit=limit, heldout=(fraction, True) if fraction else None
    )
