"""The learned transport projection (model.wire_dim): narrower plans on the wire, trained with the model."""

from __future__ import annotations

import pytest
import torch

from model.checkpoint import load_decoder, load_encoder, load_model, save_model
from model.codec import decode_plan, encode_plan
from model.config import ConfigError, load_config
from model.generation import generate
from model.model import build_model, trainable_parameters
from model.objectives import Objective


def test_off_by_default_and_parameter_counts():
    base = load_config("seed_run2")
    assert base.model.wire_dim == 0 and base.model.plan_dim == 256
    model = build_model(base.model)
    assert model.encoder.wire_down is None and model.decoder.wire_up is None
    wide = load_config("seed_run2", ["--model.wire_dim=32"])
    assert wide.model.plan_dim == 32
    # Linear(256, 32) on the encoder side, Linear(32, 256) on the decoder side; nothing else changes.
    extra = (256 * 32 + 32) + (32 * 256 + 256)
    assert trainable_parameters(build_model(wide.model)) == trainable_parameters(model) + extra


def test_config_checks():
    with pytest.raises(ConfigError, match="model.wire_dim=-1 must be >= 0"):
        load_config("debug", ["--model.wire_dim=-1"])
    with pytest.raises(ConfigError, match="model.wire_dim=8.*infonce"):
        load_config("debug", ["--model.wire_dim=8", "--objective.infonce_weight=0.5"])
    load_config("debug", ["--model.wire_dim=8", "--objective.jepa_weight=1"])  # ema_plan target: same width


@pytest.mark.parametrize("conditioning", ["cross_attn", "gated", "prefix_film"])
@pytest.mark.parametrize("bottleneck", ["plan", "none"])
def test_encoder_emits_and_decoder_expands_the_wire_plan(conditioning, bottleneck):
    cfg = load_config(
        "debug", ["--model.wire_dim=8", f"--model.conditioning={conditioning}", f"--model.bottleneck={bottleneck}"]
    )
    torch.manual_seed(0)
    model = build_model(cfg.model)
    images, ids = torch.randn(3, 3, 16, 16), torch.randint(4, 260, (3, 10))
    plan = model.encoder(images)
    assert plan.shape == (3, cfg.model.plan_len, 8)
    assert model(images, ids).logits.shape == (3, 10, 260)
    with pytest.raises(ValueError, match=r"plan must be \(B, \d+, D\) with D=8 \(model.wire_dim\), got"):
        model.decoder(torch.randn(3, cfg.model.plan_len, cfg.model.embed_dim), ids)


def test_projection_is_trained_with_the_model():
    cfg = load_config("debug", ["--model.wire_dim=8", "--objective.category_weight=1", "--objective.num_categories=5"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    objective = Objective(model, cfg.objective)
    assert objective.category_head.in_features == 8  # the head reads the pooled plan as it is shipped
    images, ids = torch.randn(4, 3, 16, 16), torch.randint(4, 260, (4, 10))
    categories = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), 5).float()
    objective(images, ids, categories=categories)["loss"].backward()
    for layer in (model.encoder.wire_down, model.decoder.wire_up):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_halves_from_a_checkpoint_round_trip_through_the_codec(tmp_path):
    cfg = load_config("debug", ["--model.wire_dim=8"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    path = tmp_path / "wire.safetensors"
    fingerprint = save_model(path, model, cfg)
    enc, dec = load_encoder(path), load_decoder(path)
    assert "wire_down.weight" in dict(enc.module.named_parameters())
    assert "wire_up.weight" in dict(dec.module.named_parameters())
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        plans = enc.module(images)  # (2, K, 8)
        wire = [encode_plan(p, fingerprint=fingerprint) for p in plans]
        assert {len(w) for w in wire} == {18 + 4 * 8 * 2}  # K=4 rows of 8 fp16 values
        received = torch.stack([decode_plan(w, expect_k=4, expect_d=cfg.model.plan_dim) for w in wire])
        whole = load_model(path).model
        direct = generate(whole.decoder, whole.encoder(images), max_new_tokens=12)
        shipped = generate(dec.module, received, max_new_tokens=12)
    assert torch.allclose(received, plans, atol=1e-2)
    assert torch.equal(direct, shipped)
