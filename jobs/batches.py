"""What each prepared row becomes: the map transforms of the Ray Data pipeline (jobs/dataset.py), also usable
without Ray (`transform_train_batch`, benchmarks.run0).

    train   one random caption per image per epoch, decode, resize, normalise, tokenise ->
            {"images" (B, 3, S, S) float32, "caption_ids" (B, T) int64, "caption_mask" (B, T) bool,
             "image_id" (B,) int64} + "categories" (B, C) float32 multi-hot with objective.category_weight > 0
    eval    every caption of each image: "caption_ids"/"caption_mask" (B, R, T), "num_captions" (B,)
    decode  once, for data.ingest=materialize: uint8 "pixels" (B, S, S, 3), captions kept as lists
    epoch   the materialised rows' per-epoch part (`epoch_batches`), on the training worker, not in a Ray task

T = model.max_seq_length, S = model.image_size. The per-epoch draws are seeded by (train.seed, epoch, the
batch's first image id), so whichever process runs a batch, the same config and epoch give the same tensors.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from jobs.shards import DataError, RowPlan, heldout_mask
from model.config import Config
from model.tokenizer import PAD, ByteTokenizer
from model.transform import normalize_uint8, open_image, resize_center_crop

MAP_BATCH_ROWS = 256  # rows per map_batches call: big enough to amortise the call, small enough to stream
# The materialised set's per-epoch draws go by chunks of this many rows (once a Ray Data map's batch size: kept,
# so the chunks and therefore the batches are those of that map)
EPOCH_MAP_ROWS = 128


@dataclass(frozen=True)
class MapConfig:
    """The few config values the map tasks need (small to ship with every task)."""

    image_size: int
    max_seq_length: int
    max_caption_chars: int
    num_categories: int  # 0: no "categories" column

    @classmethod
    def from_config(cls, cfg: Config) -> MapConfig:
        categories = cfg.objective.num_categories if cfg.objective.category_weight > 0 else 0
        return cls(cfg.model.image_size, cfg.model.max_seq_length, cfg.data.max_caption_chars, categories)


@dataclass(frozen=True)
class Draw:
    """Seed of the per-epoch random choices made in map tasks, and the clock that says which epoch it is."""

    seed: int
    clock: Any  # jobs.dataset.EpochClock actor handle, or the epoch itself (an int) outside Ray (benchmarks.run0)

    def epoch(self) -> int:
        if isinstance(self.clock, int):
            return self.clock
        import ray

        return int(ray.get(self.clock.get.remote()))


def select_rows(batch: dict[str, np.ndarray], plan: RowPlan) -> np.ndarray:
    """Indices of the batch rows this dataset keeps (hold-out rule and id ceiling)."""
    ids = batch["image_id"]
    keep = ids <= plan.max_id
    if plan.fraction > 0:
        keep &= heldout_mask(ids, plan.fraction) == plan.keep_heldout
    return np.flatnonzero(keep)


def train_batch(
    batch: dict[str, np.ndarray], *, plan: RowPlan, cfg: MapConfig, permute: bool, draw: Draw
) -> dict[str, np.ndarray]:
    """Runs in a Ray Data task (streaming ingest): pick rows, draw a caption each, decode images, tokenise."""
    return draw_rows(batch, select_rows(batch, plan), cfg=cfg, permute=permute, seed=draw.seed, epoch=draw.epoch())


def draw_rows(
    batch: dict[str, np.ndarray], rows: np.ndarray, *, cfg: MapConfig, permute: bool, seed: int, epoch: int
) -> dict[str, np.ndarray]:
    """`rows` of a batch of prepared rows ("image" bytes) or decoded ones (uint8 "pixels") -> training arrays,
    in epoch `epoch`'s row order with its caption draws."""
    # Seeded by (train.seed, epoch, first image id of the batch): the caption draw and row order change
    # every epoch and are the same in every run of this config, whichever process runs the batch.
    first_id = int(batch["image_id"][0]) if len(batch["image_id"]) else 0
    rng = np.random.default_rng([seed % 2**63, epoch, first_id])
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
    return train_batch(
        {**batch, "image_id": ids},
        plan=plan,
        cfg=MapConfig.from_config(cfg),
        permute=cfg.data.shuffle != "none",
        draw=Draw(cfg.train.seed, epoch),
    )


def epoch_batches(
    blocks: Iterable[dict[str, np.ndarray]],
    batch_size: int,
    *,
    cfg: MapConfig,
    permute: bool,
    seed: int,
    epoch: int | None,
) -> Iterator[dict[str, np.ndarray]]:
    """A worker's training batches of `batch_size` rows (the last one shorter) from its stream of blocks.

    Blocks of a streaming set are training arrays already (made by `train_batch` in Ray Data tasks). Blocks of
    a materialised set are decoded rows (`decode_rows`); their per-epoch part (row order, caption draw,
    tokenising, normalising) is done here, on the worker, in the chunks a Ray Data map with batch size
    EPOCH_MAP_ROWS made of the same blocks, with the same seeds: starting a Ray Data map every epoch cost
    ~0.1 s before the first batch (benchmarks/RESULTS.md). `epoch` is needed for a materialised set only.
    """
    blocks = (b for b in blocks if len(b["image_id"]))
    first = next(blocks, None)
    if first is None:
        return
    blocks = itertools.chain([first], blocks)
    if "pixels" in first:
        if epoch is None:
            raise ValueError("a materialised training set is drawn per epoch: pass the epoch (epoch=N)")
        blocks = (
            draw_rows(chunk, np.arange(len(chunk["image_id"])), cfg=cfg, permute=permute, seed=seed, epoch=epoch)
            for chunk in _map_chunks(blocks, EPOCH_MAP_ROWS)
        )
    yield from _rebatch(blocks, batch_size)


def _map_chunks(blocks: Iterable[dict[str, np.ndarray]], rows: int) -> Iterator[dict[str, np.ndarray]]:
    """The batches a Ray Data map with batch size `rows` cuts from these blocks: consecutive blocks are
    gathered until they hold at least `rows` rows (one task's input), which is cut into `rows`-row batches,
    the last one shorter; what is left at the end is the last task's input."""
    pending: list[dict[str, np.ndarray]] = []
    count = 0
    for block in blocks:
        pending.append(block)
        count += len(block["image_id"])
        if count >= rows:
            yield from _cut(_concat(pending), rows)
            pending, count = [], 0
    if pending:
        yield from _cut(_concat(pending), rows)


def _rebatch(blocks: Iterable[dict[str, np.ndarray]], size: int) -> Iterator[dict[str, np.ndarray]]:
    """Blocks -> batches of exactly `size` rows across block boundaries, the last one shorter (Ray's batcher);
    a batch inside one block is a view of it, no copy."""
    pending: list[dict[str, np.ndarray]] = []
    count = 0
    for block in blocks:
        pending.append(block)
        count += len(block["image_id"])
        while count >= size:
            batch = pending[0] if len(pending) == 1 else _concat(pending)
            out = {k: v[:size] for k, v in batch.items()}
            rest = {k: v[size:] for k, v in batch.items()}
            count -= size
            pending = [rest] if count else []
            yield out
    if count:
        yield _concat(pending)


def _cut(batch: dict[str, np.ndarray], rows: int) -> Iterator[dict[str, np.ndarray]]:
    n = len(batch["image_id"])
    for start in range(0, n, rows):
        yield {k: v[start : start + rows] for k, v in batch.items()}


def _concat(blocks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(blocks) == 1:
        return blocks[0]
    return {k: _concat_column([b[k] for b in blocks]) for k in blocks[0]}


def _concat_column(parts: list[np.ndarray]) -> np.ndarray:
    """Rows of one column from several blocks. A list column comes as a 2-D array from a block whose lists all
    have one length and as an object array of arrays otherwise: such mixed parts become an object array of rows."""
    if len({p.shape[1:] for p in parts}) == 1 and len({p.dtype for p in parts}) == 1:
        return np.concatenate(parts)
    out = np.empty(sum(len(p) for p in parts), dtype=object)
    out[:] = [row for p in parts for row in p]
    return out


def decode_rows(batch: dict[str, np.ndarray], *, plan: RowPlan, cfg: MapConfig) -> dict[str, Any]:
    """Once: the rows this dataset keeps, images decoded to uint8 (B, S, S, 3), captions left as lists."""
    rows = select_rows(batch, plan)
    out = {
        "image_id": batch["image_id"][rows].astype(np.int64),
        "pixels": decode_pixels([batch["image"][i] for i in rows], cfg.image_size),
        "captions": [list(batch["captions"][i]) for i in rows],
    }
    if cfg.num_categories:
        out["category_ids"] = [list(batch["category_ids"][i]) for i in rows]
    return out


def eval_batch(batch: dict[str, np.ndarray], *, plan: RowPlan, cfg: MapConfig, refs: int) -> dict[str, np.ndarray]:
    """Every caption (up to `refs` = R) of each kept image, PAD rows beyond an image's own count."""
    rows = select_rows(batch, plan)
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
