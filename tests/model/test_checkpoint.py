"""Checkpoints: bit-exact round trips, atomic saves, halves that load alone, no pickle, clear errors."""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import model.checkpoint as ckpt
from model.checkpoint import (
    CheckpointError,
    init_vision_from_checkpoint,
    load_decoder,
    load_encoder,
    load_model,
    load_vision_weights,
    model_fingerprint,
    read_config,
    save_model,
)
from model.config import load_config
from model.model import PlanEncoder, TextDecoder, build_model


def trained_like(preset: str = "debug", overrides=(), seed: int = 0):
    """A model whose weights are not the deterministic init (so a round trip proves something)."""
    cfg = load_config(preset, list(overrides))
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return cfg, model


def inputs(cfg, batch: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    m = cfg.model
    images = torch.randn(batch, 3, m.image_size, m.image_size, generator=gen)
    ids = torch.randint(4, m.vocab_size, (batch, 10), generator=gen)
    return images, ids


@pytest.mark.parametrize(
    "overrides",
    [[], ["--model.conditioning=gated"], ["--model.conditioning=prefix_film"], ["--model.bottleneck=none"]],
    ids=["cross_attn", "gated", "prefix_film", "no_bottleneck"],
)
def test_round_trip_is_bit_exact(tmp_path, overrides):
    cfg, model = trained_like(overrides=overrides)
    path = tmp_path / "model.safetensors"
    fp = save_model(path, model, cfg, extra={"epoch": "7", "run_id": "abc"})
    loaded = load_model(path)
    assert loaded.config == cfg
    assert loaded.fingerprint == fp == model_fingerprint(model) == model_fingerprint(loaded.model)
    assert loaded.extra == {"epoch": "7", "run_id": "abc"}
    original, restored = model.state_dict(), loaded.model.state_dict()
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype
        assert torch.equal(restored[name], tensor), name
    assert not loaded.model.training  # returned ready for inference
    model.eval()
    images, ids = inputs(cfg)
    with torch.no_grad():
        a, b = model(images, ids), loaded.model(images, ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.plan, b.plan)


def test_fingerprint_is_stable_and_sensitive(tmp_path):
    cfg, model = trained_like()
    fp = model_fingerprint(model)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert model_fingerprint(model) == fp == model_fingerprint(model.state_dict())
    # Saving twice gives the same fingerprint; a new file of the same weights too.
    assert save_model(tmp_path / "a.safetensors", model, cfg) == save_model(tmp_path / "b.safetensors", model, cfg)
    _, same_seed = trained_like()
    assert model_fingerprint(same_seed) == fp
    with torch.no_grad():
        model.decoder.head.weight[0, 0] += 1e-3
    assert model_fingerprint(model) != fp


def test_read_config_without_weights(tmp_path):
    cfg, model = trained_like(overrides=["--model.num_latent_vectors=6", "--train.epochs=5"])
    path = tmp_path / "m.safetensors"
    save_model(path, model, cfg)
    assert read_config(path) == cfg
    assert read_config(path).model.num_latent_vectors == 6


def test_save_failure_mid_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    cfg, model = trained_like()
    path = tmp_path / "model.safetensors"
    old_fp = save_model(path, model, cfg)
    old_bytes = path.read_bytes()

    def crash_half_way(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial garbage")  # a writer dying part-way through
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash_half_way)
    _, other = trained_like(seed=5)
    with pytest.raises(OSError, match="disk full"):
        save_model(path, other, cfg)
    assert path.read_bytes() == old_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert load_model(path).fingerprint == old_fp


def test_save_failure_at_rename_keeps_old_file(tmp_path, monkeypatch):
    cfg, model = trained_like()
    path = tmp_path / "model.safetensors"
    save_model(path, model, cfg)
    old_bytes = path.read_bytes()

    def refuse(src, dst):
        raise PermissionError("rename refused")

    monkeypatch.setattr(ckpt.os, "replace", refuse)
    _, other = trained_like(seed=5)
    with pytest.raises(PermissionError):
        save_model(path, other, cfg)
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_halves_load_alone_and_match_the_full_model(tmp_path):
    cfg, model = trained_like(overrides=["--model.conditioning=prefix_film"])
    path = tmp_path / "m.safetensors"
    fp = save_model(path, model, cfg)
    enc, dec = load_encoder(path), load_decoder(path)
    assert isinstance(enc.module, PlanEncoder) and isinstance(dec.module, TextDecoder)
    assert enc.fingerprint == dec.fingerprint == fp  # both carry the whole model's fingerprint
    assert enc.config == dec.config == cfg
    assert not any(k.startswith("decoder") for k in enc.module.state_dict())
    assert not enc.module.training and not dec.module.training
    model.eval()
    images, ids = inputs(cfg)
    with torch.no_grad():
        full = model(images, ids)
        plan = enc.module(images)
        logits = dec.module(plan, ids)
    assert torch.equal(plan, full.plan)
    assert torch.equal(logits, full.logits)


def test_file_is_plain_safetensors_and_loading_never_unpickles(tmp_path, monkeypatch):
    cfg, model = trained_like()
    path = tmp_path / "m.safetensors"
    fp = save_model(path, model, cfg)
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])  # the safetensors layout: u64 length + JSON header
    assert header["__metadata__"]["format"] == "vl-jepa/1"
    assert header["__metadata__"]["fingerprint"] == fp
    assert json.loads(header["__metadata__"]["config"]) == cfg.to_dict()
    assert set(header) - {"__metadata__"} == set(model.state_dict())
    assert b"\x80\x02" not in raw[:8] and not raw.startswith(b"PK")  # not a pickle, not a torch zip

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    assert load_model(path).fingerprint == fp
    assert load_encoder(path).fingerprint == fp


def test_corrupt_truncated_or_foreign_files_raise_checkpoint_error(tmp_path):
    cfg, model = trained_like()
    good = tmp_path / "good.safetensors"
    save_model(good, model, cfg)
    raw = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    for bad in (truncated, garbage, empty):
        with pytest.raises(CheckpointError, match=bad.name):
            load_model(bad)
        with pytest.raises(CheckpointError):
            load_decoder(bad)

    # A valid safetensors file that is not ours.
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="vl-jepa/1"):
        read_config(foreign)

    # A flipped byte inside tensor data: the file format cannot see it, the fingerprint check can.
    flipped = bytearray(raw)
    flipped[-10] ^= 0xFF
    bitrot = tmp_path / "bitrot.safetensors"
    bitrot.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_model(bitrot)

    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.safetensors")


def test_weights_that_do_not_fit_the_stored_config(tmp_path):
    cfg, model = trained_like()
    path = tmp_path / "m.safetensors"
    save_model(path, model, cfg)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "decoder.head.weight"}  # noqa: SIM118
    meta["fingerprint"] = model_fingerprint(tensors)
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=meta)
    with pytest.raises(CheckpointError, match="decoder.head.weight"):
        load_model(broken)
    with pytest.raises(CheckpointError, match="head.weight"):
        load_decoder(broken)
    assert isinstance(load_encoder(broken).module, PlanEncoder)  # the other half is intact


def test_extra_cannot_override_reserved_keys(tmp_path):
    cfg, model = trained_like()
    with pytest.raises(ValueError, match="reserved"):
        save_model(tmp_path / "m.safetensors", model, cfg, extra={"fingerprint": "0" * 16})
    with pytest.raises(TypeError):
        save_model(tmp_path / "m.safetensors", model.encoder, cfg)  # type: ignore[arg-type]


def test_vision_weights_for_a_frozen_backbone(tmp_path):
    cfg, source = trained_like()
    path = tmp_path / "pretrained.safetensors"
    fp = save_model(path, source, cfg)
    weights = load_vision_weights(path)
    assert set(weights) == set(source.encoder.vision.state_dict())

    frozen_cfg = load_config("debug", ["--model.vision_backbone=frozen", f"--model.vision_weights={path}"])
    torch.manual_seed(123)
    target = build_model(frozen_cfg.model)
    assert init_vision_from_checkpoint(target, frozen_cfg.model.vision_weights) == fp
    for name, tensor in source.encoder.vision.state_dict().items():
        assert torch.equal(target.encoder.vision.state_dict()[name], tensor)
    assert not any(p.requires_grad for p in target.encoder.vision.parameters())

    wider = build_model(load_config("debug", ["--model.embed_dim=64"]).model)
    with pytest.raises(CheckpointError, match="embed_dim"):
        init_vision_from_checkpoint(wider, path)
