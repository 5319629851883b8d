"""Training/eval input: splits and hold-out, per-epoch caption draw and shuffle, exact tensors, clear errors."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from pycocotools.coco import COCO

from jobs.dataset import (
    DataError,
    build_eval_dataset,
    build_train_dataset,
    check_categories,
    dataset_sizes,
    encode_captions,
    epoch_clock,
    heldout_mask,
    load_eval_split,
    load_split,
    multi_hot_categories,
    read_manifest,
    resolve_splits,
    torch_batches,
)
from model.config import load_config
from model.tokenizer import BOS, EOS, PAD, ByteTokenizer
from model.transform import ImageTransform

SHAPES_CFG = ["--model.image_size=32", "--model.max_seq_length=48"]


def _captions_by_id(shapes_coco, split: str) -> dict[int, list[str]]:
    coco = COCO(str(shapes_coco / "annotations" / f"captions_{split}.json"))
    return {i: [a["caption"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[i]))] for i in coco.getImgIds()}


def _epoch(ds, cfg, epoch: int = 1) -> dict[str, torch.Tensor]:
    """One epoch of training batches (or validation ones: `cfg` None) as the training loop reads them."""
    batches = list(torch_batches(ds, 32, cfg, epoch=epoch) if cfg else ds.iter_torch_batches(batch_size=32))
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


# ---------------------------------------------------------------------------
# No Ray


def test_heldout_mask_is_stable_and_nested():
    ids = np.arange(1, 20_001)
    ten, twenty = heldout_mask(ids, 0.1), heldout_mask(ids, 0.2)
    assert 0.09 < ten.mean() < 0.11 and 0.19 < twenty.mean() < 0.21
    assert not (ten & ~twenty).any()  # growing the fraction only adds images
    assert (heldout_mask(ids[::-1], 0.1) == ten[::-1]).all()  # depends on the id only
    # Pinned: the split must not change between releases or machines (a changed hash would leak val into train).
    assert (np.flatnonzero(heldout_mask(np.arange(1, 101), 0.1)) + 1).tolist() == [10, 18, 21, 41, 48, 68, 82, 83]


def test_encode_captions_fixed_length_and_truncation():
    ids, mask = encode_captions(["ab", "x" * 500, ""], max_len=12, max_chars=200)
    assert ids.shape == mask.shape == (3, 12) and ids.dtype == np.int64 and mask.dtype == bool
    assert ids[0, :4].tolist() == [BOS, ord("a") + 4, ord("b") + 4, EOS] and (ids[0, 4:] == PAD).all()
    assert ids[1, -1] == EOS and mask[1].all()  # cut to T, EOS kept
    assert ids[2, :2].tolist() == [BOS, EOS] and mask[2].sum() == 2
    long_ids, _ = encode_captions(["y" * 500], max_len=400, max_chars=200)
    assert (long_ids[0] != PAD).sum() == 202  # BOS + 200 chars + EOS: max_caption_chars applies first


def _paths(splits) -> tuple:
    """resolve_splits' (train, val) Locations as local paths."""
    return tuple(None if loc is None else Path(loc.path) for loc in splits)


def test_resolve_splits_and_errors(prepared_shapes, tmp_path):
    cfg = load_config("shapes")
    assert _paths(resolve_splits(prepared_shapes, cfg)) == (prepared_shapes / "train", prepared_shapes / "val")
    assert dataset_sizes(prepared_shapes, cfg) == (180, 36)
    held = load_config("shapes", ["--data.val_split=missing"])
    assert _paths(resolve_splits(prepared_shapes, held)) == (prepared_shapes / "train", prepared_shapes / "train")
    n_train, n_val = dataset_sizes(prepared_shapes, held)
    assert n_train + n_val == 180 and 5 <= n_val <= 35
    none = load_config("shapes", ["--data.val_split=missing", "--data.val_fraction=0"])
    assert _paths(resolve_splits(prepared_shapes, none)) == (prepared_shapes / "train", None)

    with pytest.raises(DataError, match="does not exist"):
        resolve_splits(tmp_path / "nowhere", cfg)
    with pytest.raises(DataError, match=r"no split 'train2017' .*prepared splits there: train, val"):
        resolve_splits(prepared_shapes, load_config("shapes", ["--data.train_split=train2017"]))

    broken = tmp_path / "broken"
    shutil.copytree(prepared_shapes / "val", broken / "train")
    manifest = json.loads((broken / "train" / "manifest.json").read_text())
    (broken / "train" / "part-00000.parquet").unlink()
    with pytest.raises(DataError, match="incomplete: shard"):
        read_manifest(broken / "train")
    (broken / "train" / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(DataError, match="schema_version 99"):
        read_manifest(broken / "train")
    (broken / "train" / "manifest.json").unlink()
    with pytest.raises(DataError, match="no manifest.json"):
        resolve_splits(broken, cfg)


def test_load_split_matches_sources(prepared_shapes, shapes_coco):
    val = load_split(prepared_shapes, "val", 32)
    expected = _captions_by_id(shapes_coco, "val")
    assert val.image_ids == sorted(expected) and val.images.shape == (36, 3, 32, 32)
    assert val.captions == [expected[i] for i in val.image_ids]
    assert all(len(c) == 1 and 1 <= c[0] <= 18 for c in val.category_ids)
    # Stored as lossless PNG at the source size: exactly the model transform of the original file.
    transform = ImageTransform(32)
    original = transform((shapes_coco / "val" / val.file_names[3]).read_bytes())
    assert torch.equal(val.images[3], original)
    assert len(load_split(prepared_shapes, "val", 16, limit=5)) == 5

    held = load_config("shapes", ["--data.val_split=missing"])
    heldout = load_eval_split(prepared_shapes, held)
    assert heldout is not None and len(heldout) == dataset_sizes(prepared_shapes, held)[1]
    assert heldout_mask(np.array(heldout.image_ids), 0.1).all()


# ---------------------------------------------------------------------------
# Ray Data


@pytest.mark.ray
def test_train_dataset_epochs(prepared_shapes, shapes_coco):
    cfg = load_config("shapes", SHAPES_CFG)
    clock = epoch_clock()
    ds = build_train_dataset(prepared_shapes, cfg, clock=clock)
    captions = _captions_by_id(shapes_coco, "train")
    tok = ByteTokenizer(48)
    epochs = [_epoch(ds, cfg)]
    ray.get(clock.set.remote(2))  # what the training loop's rank 0 does before each epoch
    epochs.append(_epoch(ds, cfg, 2))
    for ep in epochs:
        assert sorted(ep["image_id"].tolist()) == sorted(captions)  # every image exactly once per epoch
        assert ep["images"].shape == (180, 3, 32, 32) and ep["images"].dtype == torch.float32
        assert ep["caption_ids"].shape == (180, 48) and ep["caption_ids"].dtype == torch.int64
        assert ep["caption_mask"].dtype == torch.bool and torch.equal(ep["caption_mask"], ep["caption_ids"] != PAD)
        for image_id, ids in zip(ep["image_id"].tolist(), ep["caption_ids"], strict=True):
            assert tok.decode(ids) in captions[image_id]
    # The caption drawn for an image, and the order of images, change between epochs.
    drawn = [dict(zip(ep["image_id"].tolist(), map(tuple, ep["caption_ids"].tolist()), strict=True)) for ep in epochs]
    assert sum(drawn[0][i] != drawn[1][i] for i in captions) > 60  # 4/5 expected to differ: ~144
    assert epochs[0]["image_id"].tolist() != epochs[1]["image_id"].tolist()
    # ... and are the same whenever that epoch comes round again (a resumed run), in a new dataset too.
    ray.get(clock.set.remote(1))
    again = _epoch(build_train_dataset(prepared_shapes, cfg, clock=clock), cfg)
    assert all(torch.equal(again[k], epochs[0][k]) for k in epochs[0])
    other_seed = load_config("shapes", [*SHAPES_CFG, "--train.seed=1"])
    assert _epoch(build_train_dataset(prepared_shapes, other_seed, clock=clock), other_seed)["image_id"].tolist() != (
        epochs[0]["image_id"].tolist()
    )
    ray.kill(clock)
    # Images arrive decoded and normalised exactly like the model transform does it.
    first = epochs[0]["image_id"][0].item()
    source = ImageTransform(32)((shapes_coco / "train" / f"{first:012d}.png").read_bytes())
    assert torch.allclose(epochs[0]["images"][0], source, atol=1e-6)


@pytest.mark.ray
def test_train_dataset_holdout_and_cap(prepared_shapes):
    cfg = load_config("shapes", [*SHAPES_CFG, "--data.val_split=missing", "--data.num_samples=40"])
    ds = build_train_dataset(prepared_shapes, cfg)
    first = _epoch(ds, cfg)["image_id"].tolist()
    # The second epoch goes through the worker-side helper on a DataIterator (what get_dataset_shard returns).
    batches = list(torch_batches(ds.iterator(), 8, cfg, epoch=2))
    assert batches[0]["images"].shape == (8, 3, 32, 32) and batches[0]["caption_ids"].shape == (8, 48)
    second = torch.cat([b["image_id"] for b in batches]).tolist()
    all_ids = np.arange(1, 181)
    eligible = all_ids[~heldout_mask(all_ids, 0.1)]
    assert sorted(first) == sorted(second) == eligible[:40].tolist()  # the same 40 lowest non-held-out ids
    assert dataset_sizes(prepared_shapes, cfg)[0] == 40


@pytest.mark.ray
def test_eval_dataset_yields_every_caption(prepared_shapes, shapes_coco):
    cfg = load_config("shapes", SHAPES_CFG)
    ep = _epoch(build_eval_dataset(prepared_shapes, cfg), None)
    captions = _captions_by_id(shapes_coco, "val")
    assert ep["image_id"].tolist() == sorted(captions)  # id order, no shuffling
    assert ep["caption_ids"].shape == (36, 5, 48) and ep["num_captions"].tolist() == [5] * 36
    tok = ByteTokenizer(48)
    by_id = defaultdict(list)
    for image_id, refs in zip(ep["image_id"].tolist(), ep["caption_ids"], strict=True):
        by_id[image_id] = tok.decode_batch(refs)
    assert dict(by_id) == captions

    held = load_config("shapes", [*SHAPES_CFG, "--data.val_split=missing"])
    held_ids = _epoch(build_eval_dataset(prepared_shapes, held), None)["image_id"].numpy()
    assert heldout_mask(held_ids, 0.1).all() and len(held_ids) == dataset_sizes(prepared_shapes, held)[1]
    assert (
        build_eval_dataset(prepared_shapes, load_config("shapes", ["--data.val_split=x", "--data.val_fraction=0"]))
        is None
    )


@pytest.mark.ray
def test_train_dataset_carries_instance_categories_when_the_objective_needs_them(prepared_shapes, shapes_coco):
    inst = COCO(str(shapes_coco / "annotations" / "instances_train.json"))
    expected = {i: {a["category_id"] for a in inst.loadAnns(inst.getAnnIds(imgIds=[i]))} for i in inst.getImgIds()}
    cfg = load_config("shapes", [*SHAPES_CFG, "--objective.category_weight=1", "--objective.num_categories=19"])
    ep = _epoch(build_train_dataset(prepared_shapes, cfg), cfg)
    assert ep["categories"].shape == (180, 19) and ep["categories"].dtype == torch.float32
    for image_id, row in zip(ep["image_id"].tolist(), ep["categories"], strict=True):
        assert set(torch.nonzero(row).flatten().tolist()) == expected[image_id] and row.sum() == 1
    # without the term the column is not read at all
    plain = load_config("shapes", [*SHAPES_CFG, "--objective.category_weight=0"])
    assert "categories" not in next(torch_batches(build_train_dataset(prepared_shapes, plain), 4, plain, epoch=1))


def test_category_checks_name_the_problem(prepared_shapes, tmp_path):
    small = load_config("shapes", ["--objective.category_weight=1", "--objective.num_categories=10"])
    with pytest.raises(DataError, match=r"category ids 1\.\.18: objective.num_categories=10 must be at least 19"):
        check_categories(prepared_shapes, small)
    with pytest.raises(DataError, match="outside objective.num_categories=10"):
        multi_hot_categories([[1, 2], [12]], 10)
    bare = tmp_path / "bare"
    shutil.copytree(prepared_shapes, bare)
    for split in ("train", "val"):
        manifest = json.loads((bare / split / "manifest.json").read_text())
        manifest["categories"] = []
        (bare / split / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="needs instance categories.*without instances_<split>.json"):
        check_categories(bare, load_config("shapes", ["--objective.category_weight=1"]))
