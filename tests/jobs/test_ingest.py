"""data.ingest: a materialised training dataset yields what the streaming one does, reshuffled and redrawn per epoch."""

from __future__ import annotations

import shutil

import pytest
import torch

from jobs.dataset import (
    CAPTION_BYTES_PER_ROW,
    build_train_dataset,
    choose_ingest,
    decoded_nbytes,
    epoch_clock,
    torch_batches,
)
from model.config import ConfigError, load_config
from model.tokenizer import ByteTokenizer

SHAPES_CFG = ["--model.image_size=32", "--model.max_seq_length=48"]


def _epoch(ds, cfg=None) -> dict[str, torch.Tensor]:
    """One epoch, through the training loop's `torch_batches` (zero-copy collate) when given its config,
    else through Ray's default Arrow collate."""
    batches = list(torch_batches(ds, 32, cfg) if cfg else ds.iter_torch_batches(batch_size=32))
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
    reference = _epoch(build_train_dataset(prepared_shapes, stream_cfg, clock=clock))
    cfg = load_config("shapes", [*SHAPES_CFG, *extra, "--data.ingest=materialize"])
    copy = tmp_path / "prepared"
    shutil.copytree(prepared_shapes, copy)
    mat = build_train_dataset(copy, cfg, clock=clock)
    shutil.rmtree(copy)  # decoded into the object store already: no epoch reads the shards again
    epochs = []
    for epoch in (1, 2, 3):
        ray.get(clock.set.remote(epoch))  # what the training loop's rank 0 does before each epoch
        epochs.append(_epoch(mat, cfg))
    ray.get(clock.set.remote(2))
    again = _epoch(mat, cfg)  # an epoch that comes round again (a resumed run) sees the same data
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
    a = _epoch(ds)
    ray.get(clock.set.remote(2))
    b = _epoch(ds)
    ray.kill(clock)
    assert a["image_id"].tolist() == b["image_id"].tolist() == sorted(a["image_id"].tolist())
    assert not torch.equal(a["caption_ids"], b["caption_ids"])
