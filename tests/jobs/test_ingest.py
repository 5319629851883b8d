"""data.ingest: a materialised training dataset yields what the streaming one does, reshuffled and redrawn per epoch,
the per-epoch draws made on the worker (`torch_batches`) exactly as a per-epoch Ray Data map made them."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from jobs import dataset
from jobs.batches import EPOCH_MAP_ROWS, Draw, MapConfig, draw_rows, epoch_batches, train_batch
from jobs.dataset import (
    CAPTION_BYTES_PER_ROW,
    build_train_dataset,
    choose_ingest,
    decoded_nbytes,
    epoch_clock,
    heldout_mask,
    plan_training,
    torch_batches,
)
from model.config import ConfigError, load_config
from model.tokenizer import ByteTokenizer

SHAPES_CFG = ["--model.image_size=32", "--model.max_seq_length=48"]


def _epoch(ds, cfg, epoch: int = 1) -> dict[str, torch.Tensor]:
    """One epoch through the training loop's `torch_batches`."""
    batches = list(torch_batches(ds, 32, cfg, epoch=epoch))
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _by_id(ep: dict[str, torch.Tensor], key: str) -> dict[int, torch.Tensor]:
    return dict(zip(ep["image_id"].tolist(), ep[key], strict=True))


def test_choose_ingest():
    cfg = load_config("seed_run2")  # 64 px: 12,288 pixel bytes + captions per row
    assert cfg.data.ingest == "auto"
    assert decoded_nbytes(cfg, 20_000) == 20_000 * (64 * 64 * 3 + CAPTION_BYTES_PER_ROW)  # ~266 MB
    assert choose_ingest(cfg, 20_000, free_bytes=2e9) == "materialize"
    assert choose_ingest(cfg, 20_000, free_bytes=4e8) == "stream"  # needs more than half the free store
    assert choose_ingest(cfg, 118_287, free_bytes=2e9) == "stream"  # all of COCO train: ~1.6 GB
    for forced in ("stream", "materialize"):
        cfg = load_config("seed_run2", [f"--data.ingest={forced}"])
        assert choose_ingest(cfg, 20_000, free_bytes=2e9) == forced == choose_ingest(cfg, 10**7, free_bytes=0)
    with pytest.raises(ConfigError, match="data.ingest='eager' is not one of auto, materialize, stream"):
        load_config("seed_run2", ["--data.ingest=eager"])


@pytest.mark.ray
def test_materialized_epochs_match_streaming_and_vary(prepared_shapes, tmp_path):
    import ray

    # The category column too, so every column the map carries is checked.
    extra = ["--objective.category_weight=1", "--objective.num_categories=19"]
    clock = epoch_clock()
    stream_cfg = load_config("shapes", [*SHAPES_CFG, *extra, "--data.ingest=stream"])
    reference = _epoch(build_train_dataset(prepared_shapes, stream_cfg, clock=clock), stream_cfg)
    cfg = load_config("shapes", [*SHAPES_CFG, *extra, "--data.ingest=materialize"])
    copy = tmp_path / "prepared"
    shutil.copytree(prepared_shapes, copy)
    mat = build_train_dataset(copy, cfg, clock=clock)
    shutil.rmtree(copy)  # decoded into the object store already: no epoch reads the shards again
    epochs = []
    for epoch in (1, 2, 3):
        ray.get(clock.set.remote(epoch))  # what the training loop's rank 0 does before each epoch
        epochs.append(_epoch(mat, cfg, epoch))
    ray.get(clock.set.remote(2))
    again = _epoch(mat, cfg, 2)  # an epoch that comes round again (a resumed run) sees the same data
    ray.kill(clock)
    assert all(torch.equal(again[k], epochs[1][k]) for k in again)
    tok = ByteTokenizer(48)
    ref_images, ref_categories = _by_id(reference, "images"), _by_id(reference, "categories")
    for ep in epochs:
        assert sorted(ep["image_id"].tolist()) == sorted(ref_images)  # every image exactly once per epoch
        assert ep["images"].dtype == torch.float32 and ep["caption_ids"].shape == (len(ref_images), 48)
        assert ep["caption_ids"].dtype == torch.int64 and ep["caption_mask"].dtype == torch.bool
        for image_id, pixels in _by_id(ep, "images").items():  # decoded once, normalised as when streaming
            assert torch.equal(pixels, ref_images[image_id])
        for image_id, categories in _by_id(ep, "categories").items():
            assert torch.equal(categories, ref_categories[image_id])
        assert torch.equal(ep["caption_mask"], ep["caption_ids"] != 0)
    # Captions are redrawn and rows reshuffled every epoch, although nothing is decoded again.
    drawn = [{i: tok.decode(c) for i, c in _by_id(ep, "caption_ids").items()} for ep in epochs]
    for a, b in ((0, 1), (1, 2)):
        assert sum(drawn[a][i] != drawn[b][i] for i in ref_images) > len(ref_images) // 2  # 4/5 expected
        assert epochs[a]["image_id"].tolist() != epochs[b]["image_id"].tolist()
    # Each drawn caption is one of the image's own: at most its 5, over the stream's and 3 materialised epochs.
    pool: dict[int, set[str]] = {}
    for ep in [reference, *epochs]:
        for i, c in _by_id(ep, "caption_ids").items():
            pool.setdefault(i, set()).add(tok.decode(c))
    assert all(1 <= len(v) <= 5 for v in pool.values()) and max(len(v) for v in pool.values()) >= 3


@pytest.mark.ray
def test_materialized_without_shuffle_keeps_the_order_but_redraws(prepared_shapes):
    import ray

    cfg = load_config("shapes", [*SHAPES_CFG, "--data.ingest=materialize", "--data.shuffle=none"])
    clock = epoch_clock()
    ds = build_train_dataset(prepared_shapes, cfg, clock=clock)
    a = _epoch(ds, cfg, 1)
    ray.get(clock.set.remote(2))
    b = _epoch(ds, cfg, 2)
    ray.kill(clock)
    assert a["image_id"].tolist() == b["image_id"].tolist() == sorted(a["image_id"].tolist())
    assert not torch.equal(a["caption_ids"], b["caption_ids"])


@pytest.mark.ray
def test_worker_side_draws_are_the_per_epoch_map_batches(prepared_shapes, monkeypatch):
    """The materialised set's per-epoch part runs on the worker, not in a Ray Data map; its batches are bit for
    bit those such a map (batch size EPOCH_MAP_ROWS, seeded by the clock's epoch) makes of the same blocks,
    so the golden loss curve and resumed runs did not move. Decoded blocks of 48-59 rows (decode calls of 40
    rows over 64-row shards, 10% held out) make the map's tasks gather several blocks, the case a per-block draw
    would get wrong. Each epoch's block order is seeded by the clock's epoch, not by how often the set was read."""
    import ray

    monkeypatch.setattr(dataset, "MAP_BATCH_ROWS", 40)
    cfg = load_config("shapes", [*SHAPES_CFG, "--data.ingest=materialize", "--data.val_split=missing"])
    clock = epoch_clock()
    ds = build_train_dataset(prepared_shapes, cfg, clock=clock)
    rows = int((~heldout_mask(np.arange(1, 181), 0.1)).sum())  # 165 of the 180 training images
    sizes = [len(b["image_id"]) for b in ds.iter_batches(batch_size=None)]
    assert len(sizes) >= 3 and max(sizes) < EPOCH_MAP_ROWS and sum(sizes) == rows
    with pytest.raises(ValueError, match="materialised training set is drawn per epoch: pass the epoch"):
        next(torch_batches(ds, 32, cfg))
    per_epoch_map = ds.map_batches(
        train_batch,
        fn_kwargs={
            "plan": plan_training(prepared_shapes, cfg).rows,
            "cfg": MapConfig.from_config(cfg),
            "permute": True,
            "draw": Draw(cfg.train.seed, clock),
        },
        batch_size=EPOCH_MAP_ROWS,
        batch_format="numpy",
        zero_copy_batch=True,
    )
    seen = {}
    for epoch in (1, 2, 1):
        ray.get(clock.set.remote(epoch))
        mine = list(torch_batches(ds, 32, cfg, epoch=epoch))
        ids = torch.cat([b["image_id"] for b in mine]).tolist()
        assert seen.setdefault(epoch, ids) == ids  # an epoch read again: the same blocks in the same order
        theirs = list(per_epoch_map.iter_batches(batch_size=32, batch_format="numpy"))
        assert [len(b["image_id"]) for b in mine] == [32] * (rows // 32) + [rows % 32]
        assert len(mine) == len(theirs) and all(b.keys() == t.keys() for b, t in zip(mine, theirs, strict=True))
        for b, t in zip(mine, theirs, strict=True):
            for key in b:
                np.testing.assert_array_equal(b[key].numpy(), t[key])
    assert seen[1] != seen[2]
    ray.kill(clock)


def test_epoch_batches_gather_blocks_like_a_map_task_and_rebatch_across_them():
    """No Ray: decoded blocks of 100 and 60 rows are one map task's input (>= EPOCH_MAP_ROWS together), cut into
    draws of 128 + 32 rows, then batches of 48 across the draws' boundary; the second block's caption lists have
    uneven lengths (an object column) while the first's all have 5 (a 2-D column), as Ray hands them over."""
    size, rng = 8, np.random.default_rng(0)
    cfg = MapConfig(image_size=size, max_seq_length=16, max_caption_chars=20, num_categories=0)

    def block(first: int, n: int, ragged: bool) -> dict[str, np.ndarray]:
        caps = [[f"img {first + i} cap {k}" for k in range(5 - (i % 3 if ragged else 0))] for i in range(n)]
        column = np.empty(n, dtype=object) if ragged else np.array(caps)
        if ragged:
            column[:] = [np.array(c) for c in caps]
        pixels = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        return {"image_id": np.arange(first, first + n, dtype=np.int64), "pixels": pixels, "captions": column}

    blocks = [block(1, 100, False), block(101, 60, True)]
    got = list(epoch_batches(blocks, 48, cfg=cfg, permute=True, seed=3, epoch=2))
    assert [len(b["image_id"]) for b in got] == [48, 48, 48, 16]
    whole = {
        k: np.concatenate([b[k] for b in blocks]) if k != "captions" else [c for b in blocks for c in b[k]]
        for k in blocks[0]
    }
    want = [
        draw_rows(
            {k: v[s : s + EPOCH_MAP_ROWS] for k, v in whole.items()},
            np.arange(n),
            cfg=cfg,
            permute=True,
            seed=3,
            epoch=2,
        )
        for s, n in ((0, 128), (128, 32))
    ]
    for key in want[0]:
        np.testing.assert_array_equal(np.concatenate([b[key] for b in got]), np.concatenate([w[key] for w in want]))
    drawn = {
        int(i): ByteTokenizer(16).decode(c) for i, c in zip(got[0]["image_id"], got[0]["caption_ids"], strict=True)
    }
    assert all(text.startswith(f"img {i} cap") for i, text in drawn.items())
    assert list(epoch_batches([], 48, cfg=cfg, permute=True, seed=3, epoch=None)) == []
