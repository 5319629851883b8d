"""Training and evaluation input as Ray Datasets, from a prepared folder (local or a URI: jobs/storage.py).

    build_train_dataset(root, cfg)      read -> per-epoch shuffle -> map_batches on CPU (jobs/batches.train_batch);
                                        data.ingest=materialize: the decoded rows are materialised once and an
                                        epoch only reorders their blocks (the rest is done by torch_batches)
    build_eval_dataset(root, cfg)       every caption of each validation image: "caption_ids" (R, T), ...
    torch_batches(shard, batch, cfg, epoch=N)   the worker side: get_dataset_shard("train") -> dicts of tensors

The pieces it is built from, each in its own module and re-exported here for the callers:
    jobs/shards.py     manifests, splits, the hold-out rule, which rows a dataset reads (DataError)
    jobs/batches.py    what each row becomes (decode, caption draw, tokenise): the map transforms, and the
                       worker-side per-epoch draws of a materialised set (epoch_batches)
    jobs/eval_set.py   the plain reader (pyarrow only): load_split / load_eval_split -> EvalSet

Shuffling, measured by `python -m benchmarks.data` (figures in benchmarks/RESULTS.md): `data.shuffle=file`
reseeds the shard order every epoch and streams with no barrier; `block` (randomize_block_order) is an
all-to-all step that reads every shard before the first batch; Ray's local shuffle buffer adds latency and
copies. Both modes also permute the rows inside each map batch, which is free. `none`: fixed order.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs

from jobs.batches import (
    EPOCH_MAP_ROWS,
    MAP_BATCH_ROWS,
    Draw,
    MapConfig,
    decode_images,
    decode_pixels,
    decode_rows,
    encode_captions,
    epoch_batches,
    eval_batch,
    multi_hot_categories,
    train_batch,
    transform_train_batch,
)
from jobs.eval_set import EvalSet, load_eval_split, load_split
from jobs.shards import (
    DataError,
    DataPlan,
    RowPlan,
    check_categories,
    dataset_sizes,
    heldout_mask,
    holdout,
    locate,
    plan_rows,
    plan_training,
    read_manifest,
    resolve_splits,
    shard_paths,
    split_exists,
)
from jobs.storage import Where
from model.config import Config

if TYPE_CHECKING:
    import ray.data

__all__ = [  # this module's own API, then the re-exported pieces its callers use
    "CAPTION_BYTES_PER_ROW",
    "EPOCH_MAP_ROWS",
    "MAP_BATCH_ROWS",
    "OBJECT_STORE_SHARE",
    "DataError",
    "DataPlan",
    "EpochClock",
    "EvalSet",
    "RowPlan",
    "build_eval_dataset",
    "build_train_dataset",
    "check_categories",
    "choose_ingest",
    "dataset_sizes",
    "decode_images",
    "decode_pixels",
    "decoded_nbytes",
    "encode_captions",
    "epoch_clock",
    "heldout_mask",
    "load_eval_split",
    "load_split",
    "locate",
    "multi_hot_categories",
    "plan_rows",
    "plan_training",
    "read_manifest",
    "resolve_splits",
    "shard_paths",
    "split_exists",
    "torch_batches",
    "transform_train_batch",
]


# ---------------------------------------------------------------------------
# Ray Data: training and validation datasets


def build_train_dataset(
    data_dir: Where, cfg: Config, *, clock: Any = None, plan: DataPlan | None = None
) -> ray.data.Dataset:
    """Training dataset; every epoch reorders the shards, permutes rows and redraws one caption per image.

    All of it is seeded by (train.seed, epoch), the epoch read from `clock` (an `EpochClock` actor that the
    training loop sets; a new one at epoch 1 when None), and rows arrive in a deterministic order
    (`preserve_order`), so the same config and seed give the same batches, after a resume too.
    `plan`: the driver's `plan_training` result, so the shards' ids are not read again.

    `data.ingest` (see `choose_ingest`): "stream" reads and decodes the shards in every epoch;
    "materialize" decodes them once into the object store and each epoch only reorders their blocks: the
    dataset then yields decoded rows, which `torch_batches` turns into training batches on the worker (rows
    permuted, captions drawn and tokenised, pixels normalised, seeded by (train.seed, its `epoch`)), so read it
    through `torch_batches` whatever the mode. "auto" materialises when the decoded rows fit.
    """
    plan = plan or plan_training(data_dir, cfg)
    if plan.rows.rows == 0:
        raise DataError(
            f"no training rows in {plan.train_dir} (held-out fraction {plan.fraction}, "
            f"num_samples {cfg.data.num_samples})"
        )
    clock = clock if clock is not None else epoch_clock()
    draw = Draw(seed=cfg.train.seed, clock=clock)
    file_shuffle, block_seed = _epoch_seeded()
    seed = block_seed(seed=cfg.train.seed, reseed_after_execution=True, clock=clock)
    shuffle_files = file_shuffle(seed=cfg.train.seed, clock=clock) if cfg.data.shuffle == "file" else None
    columns = ["category_ids"] if cfg.objective.category_weight > 0 else []
    ds = _read_shards(plan.rows, shuffle_files, cfg.data.num_cpus_per_map, columns)
    ds.context.execution_options.preserve_order = True  # this dataset's context copy: a deterministic row order
    if choose_ingest(cfg, plan.rows.rows) == "materialize":
        return _materialized_train_dataset(ds, plan.rows, cfg, seed)
    if cfg.data.shuffle == "block":
        ds = _randomize_block_order(ds, seed)
    return ds.map_batches(
        train_batch,
        fn_kwargs={
            "plan": plan.rows,
            "cfg": MapConfig.from_config(cfg),
            "permute": cfg.data.shuffle != "none",
            "draw": draw,
        },
        batch_size=MAP_BATCH_ROWS,
        batch_format="numpy",
        num_cpus=cfg.data.num_cpus_per_map,
        zero_copy_batch=True,
    )


def build_eval_dataset(data_dir: Where, cfg: Config, *, limit: int = 0) -> ray.data.Dataset | None:
    """Validation images in id order, each with every caption: "caption_ids"/"caption_mask" are (R, T).

    R = the most captions any image of the split has; rows beyond an image's "num_captions" are all PAD
    with an all-False mask. None when the config has no validation data.
    """
    _train, val, fraction = holdout(data_dir, cfg)
    if val is None:
        return None
    plan = plan_rows(val, fraction, keep_heldout=True, cap=limit)
    if plan.rows == 0:
        return None
    refs = int(read_manifest(val)["max_captions_per_image"])
    ds = _read_shards(plan, None, cfg.data.num_cpus_per_map)
    ds.context.execution_options.preserve_order = True  # this dataset's own context copy: rows in id order
    return ds.map_batches(
        eval_batch,
        fn_kwargs={"plan": plan, "cfg": MapConfig.from_config(cfg), "refs": refs},
        batch_size=MAP_BATCH_ROWS,
        batch_format="numpy",
        num_cpus=cfg.data.num_cpus_per_map,
        zero_copy_batch=True,
    )


def _read_shards(plan: RowPlan, shuffle: Any, num_cpus: float, extra: list[str] | None = None) -> ray.data.Dataset:
    """One block per shard, only the columns training needs, through the shards' own pyarrow filesystem.

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
        ds = ray.data.read_parquet(
            plan.files,
            filesystem=plan.fs or pyarrow.fs.LocalFileSystem(),
            shuffle=shuffle,
            override_num_blocks=len(plan.files),
            num_cpus=num_cpus,
        )
    finally:
        ctx.use_datasource_v2 = previous
    return ds.select_columns(["image_id", "image", "captions", *(extra or [])])


def torch_batches(shard: Any, batch_size: int, cfg: Config, *, epoch: int | None = None, device: Any = "auto"):
    """Worker side: `torch_batches(ray.train.get_dataset_shard("train"), per_worker_batch, cfg, epoch=N)` -> dicts
    of tensors, batches of `batch_size` rows (the last one shorter).

    The shard's blocks come as numpy (`jobs.batches.epoch_batches`: a materialised set's per-epoch draws are
    made here, for epoch `epoch`) and become tensors without a copy, instead of going through Arrow and a
    thread pool per batch (Ray's default collate). `device` "auto": Ray Train's device in a Train worker, else CPU.
    """
    import torch

    if device == "auto":
        from ray.train.torch import get_device
        from ray.train.utils import _in_ray_train_worker  # what Ray's own iter_torch_batches asks

        device = get_device() if _in_ray_train_worker() else "cpu"
    device = torch.device(device)
    blocks = shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=cfg.data.prefetch_batches)
    batches = epoch_batches(
        blocks,
        batch_size,
        cfg=MapConfig.from_config(cfg),
        permute=cfg.data.shuffle != "none",
        seed=cfg.train.seed,
        epoch=epoch,
    )
    with warnings.catch_warnings():
        # Arrays read from the object store are read-only; as in Ray's own conversion, nothing writes to a
        # batch's tensors (the training step only reads them), so sharing them is safe.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for batch in batches:
            yield {key: torch.from_numpy(value).to(device) for key, value in batch.items()}


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


def _materialized_train_dataset(ds: ray.data.Dataset, plan: RowPlan, cfg: Config, seed: Any) -> ray.data.Dataset:
    """Decode the selected rows once (blocking, into the object store); per epoch only the block order changes.

    Rows, captions and pixels of an epoch are drawn by `torch_batches` on the worker: a per-epoch Ray Data
    map here took ~0.15 s to its first batch every epoch, ~0.1 s of it Ray Data's execution start-up
    (benchmarks/RESULTS.md), where the block order alone takes ~0.03 s.
    """
    decoded = ds.map_batches(
        decode_rows,
        fn_kwargs={"plan": plan, "cfg": MapConfig.from_config(cfg)},
        batch_size=MAP_BATCH_ROWS,
        batch_format="numpy",
        num_cpus=cfg.data.num_cpus_per_map,
        zero_copy_batch=True,
    ).materialize()
    if cfg.data.shuffle == "none":
        return decoded
    # On materialised blocks this only permutes references: the per-epoch counterpart of the file shuffle.
    return _randomize_block_order(decoded, seed)


def _randomize_block_order(ds: ray.data.Dataset, seed: Any) -> ray.data.Dataset:
    """`ds.randomize_block_order` seeded by `seed` (an `EpochBlockSeed`: train.seed and the clock's epoch).

    Ray 2.60 rebuilds the seed config it is given as a plain RandomSeedConfig (create_seed_config), which drops
    the clock: the block order then followed Ray's execution counter, so an epoch read twice (a resumed run,
    a second dataset) came in another order (found by tests/jobs/test_ingest.py). The logical operator gets
    the epoch-seeded config back here; it is what the physical plan reads when each execution starts.
    """
    out = ds.randomize_block_order(seed=seed)
    op = out._logical_plan.dag
    if type(op).__name__ != "RandomizeBlocks" or not hasattr(op, "seed_config"):
        raise RuntimeError(f"randomize_block_order built {type(op).__name__}: this Ray's plan is not the one expected")
    object.__setattr__(op, "seed_config", seed)  # a frozen dataclass
    return out


# ---------------------------------------------------------------------------
# The epoch clock: which epoch the seeded shuffles and draws are for


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
            epoch = Draw(self.seed, self.clock).epoch()
            return int(np.random.SeedSequence([self.seed % 2**63, epoch]).generate_state(1)[0])

    @dataclass
    class EpochBlockSeed(ray.data.RandomSeedConfig):
        clock: Any = None

        def get_seed_tuple(self, *, data_context: Any) -> Any:
            seed = super().get_seed_tuple(data_context=data_context)  # (seed, Ray's execution index)
            return dataclasses.replace(seed, execution_idx=Draw(self.seed, self.clock).epoch())

    return EpochFileShuffle, EpochBlockSeed
