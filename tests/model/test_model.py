"""The architecture: exact parameter counts, masking, conditioning variants, dropout modes, learning."""

from __future__ import annotations

import pytest
import torch

from model.config import load_config
from model.model import (
    VLJEPA,
    FiLM,
    build_model,
    query_token_ids,
    sincos_1d,
    sincos_2d,
    trainable_parameters,
)
from model.objectives import caption_ce

VARIANTS = ["cross_attn", "gated", "prefix_film"]


def debug_model(*overrides: str, seed: int = 0) -> VLJEPA:
    torch.manual_seed(seed)
    return build_model(load_config("debug", list(overrides)).model)


def randomize(model: VLJEPA, seed: int = 1) -> VLJEPA:
    """Move every weight off its special init (FiLM identity, zero biases) so no path is trivially inert."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def batch(model: VLJEPA, b: int = 3, t: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    s = model.cfg.image_size
    images = torch.randn(b, 3, s, s, generator=gen)
    ids = torch.randint(4, 260, (b, t), generator=gen)
    ids[:, 0] = 1
    return images, ids


# ---------------------------------------------------------------------------
# Parameter counts: the log's figures to the unit


@pytest.mark.parametrize(
    ("preset", "expected"), [("seed_run2", 16_930_048), ("seed_run3", 16_995_844), ("seed_run4", 18_052_608)]
)
def test_seed_parameter_counts_match_the_log(preset: str, expected: int) -> None:
    model = build_model(load_config(preset).model)
    assert trainable_parameters(model) == expected


def test_spec_module_counts_at_seed_size() -> None:
    model = build_model(load_config("seed_run2").model)
    enc = model.encoder
    assert trainable_parameters(enc.vision) == 3_225_344
    assert trainable_parameters(enc.text) == 3_258_880
    assert trainable_parameters(enc.fusion) == 4_216_320
    assert trainable_parameters(enc.fusion.blocks[0]) == 1_053_952
    assert trainable_parameters(enc.predictor) == 1_847_296
    assert trainable_parameters(enc.vision.blocks[0]) == 789_760
    assert trainable_parameters(model.decoder.blocks[0]) == 1_053_952
    assert model.decoder.head.bias is None


def test_no_bottleneck_control_builds_only_vision_and_decoder() -> None:
    model = debug_model("--model.bottleneck=none")
    assert model.encoder.text is None and model.encoder.fusion is None and model.encoder.predictor is None
    expected = trainable_parameters(model.encoder.vision) + trainable_parameters(model.decoder)
    assert trainable_parameters(model) == expected
    images, ids = batch(model)
    out = model(images, ids)
    assert out.plan.shape == (3, model.cfg.num_patches, model.cfg.embed_dim)
    assert out.logits.shape == (3, 10, 260)


def test_frozen_backbone_excludes_vision_from_training() -> None:
    scratch = debug_model()
    frozen = debug_model("--model.vision_backbone=frozen")
    assert not any(p.requires_grad for p in frozen.encoder.vision.parameters())
    assert trainable_parameters(frozen) == trainable_parameters(scratch) - trainable_parameters(scratch.encoder.vision)


# ---------------------------------------------------------------------------
# Shapes, names, initialisation


def test_forward_shapes_and_query_buffer_not_in_state_dict() -> None:
    model = debug_model()
    images, ids = batch(model)
    logits, plan = model(images, ids)
    assert logits.shape == (3, 10, 260)
    assert plan.shape == (3, model.cfg.num_latent_vectors, model.cfg.embed_dim)
    state = model.state_dict()
    assert "encoder.query_ids" not in state
    assert {"encoder.vision.patch_embed.weight", "encoder.vision.pos_embed", "decoder.head.weight"} <= set(state)
    assert model.encoder.query_ids.tolist() == [query_token_ids("describe the image")]


def test_position_tables_start_as_sincos_and_are_learned() -> None:
    model = debug_model("--model.conditioning=prefix_film")
    cfg = model.cfg
    vision_pos = model.encoder.vision.pos_embed
    assert torch.allclose(vision_pos[0], sincos_2d(cfg.image_size // cfg.patch_size, cfg.embed_dim))
    assert torch.allclose(model.encoder.text.pos_embed[0], sincos_1d(cfg.max_seq_length, cfg.embed_dim))
    # The prefix rows extend the decoder table.
    assert model.decoder.pos_embed.shape == (1, cfg.num_latent_vectors + cfg.max_seq_length, cfg.embed_dim)
    assert vision_pos.requires_grad and model.decoder.pos_embed.requires_grad


def test_film_is_identity_at_init() -> None:
    film = FiLM(16)
    film.reset_identity()
    h, cond = torch.randn(2, 5, 16), torch.randn(2, 16)
    assert torch.equal(film(h, cond), h)
    model = debug_model("--model.conditioning=prefix_film")
    D = model.cfg.embed_dim
    h, cond = torch.randn(2, 5, D), torch.randn(2, D)
    for block in model.decoder.blocks:
        for f in (block.film1, block.film2):
            assert torch.equal(f(h, cond), h)


def test_gate_starts_high() -> None:
    model = debug_model("--model.conditioning=gated", "--model.gate_init_logit=2.0")
    for block in model.decoder.blocks:
        assert torch.sigmoid(block.cross_gate).item() == pytest.approx(0.8808, abs=1e-4)


def test_bad_inputs_raise_precise_errors() -> None:
    model = debug_model()
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 16, 16\)"):
        model(torch.randn(1, 3, 32, 32), torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds max_seq_length=48"):
        model(torch.randn(1, 3, 16, 16), torch.ones(1, 49, dtype=torch.long))


# ---------------------------------------------------------------------------
# Masking: causal text, visible plan/prefix


@pytest.mark.parametrize("conditioning", VARIANTS)
def test_text_is_causal_and_plan_reaches_the_first_position(conditioning: str) -> None:
    model = randomize(debug_model(f"--model.conditioning={conditioning}")).eval()
    images, ids = batch(model)
    plan = model.encoder(images)
    base = model.decoder(plan, ids)
    for j in (1, 5, 9):
        changed = ids.clone()
        changed[:, j] = (changed[:, j] + 7) % 256 + 4
        logits = model.decoder(plan, changed)
        assert torch.allclose(logits[:, :j], base[:, :j], atol=1e-6), f"position {j} leaked backwards"
        assert not torch.allclose(logits[:, j], base[:, j], atol=1e-4)
    other = model.decoder(plan + torch.randn_like(plan), ids)
    assert not torch.allclose(other[:, 0], base[:, 0], atol=1e-4), "the first text position must see the plan"


def test_prefix_mask_is_bidirectional_in_prefix_and_causal_in_text() -> None:
    model = debug_model("--model.conditioning=prefix_film")
    P, T = model.decoder.prefix_len, 6
    mask = model.decoder._mask(0, P + T, torch.device("cpu"))
    assert mask[:P, :P].all() and not mask[:P, P:].any()
    assert mask[P:, :P].all()
    assert torch.equal(mask[P:, P:], torch.ones(T, T, dtype=torch.bool).tril())


def test_no_bottleneck_decoder_reads_every_patch() -> None:
    model = randomize(debug_model("--model.bottleneck=none", "--model.conditioning=prefix_film")).eval()
    images, ids = batch(model)
    plan = model.encoder(images)
    base = model.decoder(plan, ids)
    for p in range(plan.shape[1]):
        moved = plan.clone()
        moved[:, p] += 1.0
        assert not torch.allclose(model.decoder(moved, ids)[:, 0], base[:, 0], atol=1e-5)


# ---------------------------------------------------------------------------
# Dropouts: training only


@pytest.mark.parametrize(("conditioning", "option"), [("prefix_film", "word_dropout"), ("gated", "plan_dropout")])
def test_dropouts_act_only_in_training(conditioning: str, option: str) -> None:
    model = randomize(debug_model(f"--model.conditioning={conditioning}", f"--model.{option}=0.3"))
    images, ids = batch(model, b=4, t=12)
    model.eval()
    assert torch.equal(model(images, ids).logits, model(images, ids).logits)
    model.train()
    assert not torch.equal(model(images, ids).logits, model(images, ids).logits)
    # Without the dropout, training mode is deterministic too: the randomness above is the dropout.
    plain = randomize(debug_model(f"--model.conditioning={conditioning}")).train()
    assert torch.equal(plain(images, ids).logits, plain(images, ids).logits)


def test_word_dropout_zeroes_whole_token_embeddings() -> None:
    model = debug_model("--model.word_dropout=0.5").train()
    _, ids = batch(model, b=4, t=12)
    dec = model.decoder
    ctx = dec.context(torch.zeros(4, dec.plan_len, model.cfg.embed_dim))
    torch.manual_seed(3)
    x = dec._embed(ids, ctx, 0) - dec.pos_embed[:, : ids.shape[1]]  # (B, T, D): token part only
    emb = dec.tok_embed(ids)
    dropped = (x == 0).all(-1)
    kept = torch.isclose(x, emb, atol=1e-6).all(-1)
    assert (dropped | kept).all(), "a token is either whole or entirely zeroed"
    assert dropped.any() and kept.any()


# ---------------------------------------------------------------------------
# Learning: information flows image -> plan -> text


def test_debug_model_learns_two_captions_for_two_images() -> None:
    from model.generation import caption_images
    from model.tokenizer import ByteTokenizer

    model = debug_model(seed=0)
    tok = ByteTokenizer(model.cfg.max_seq_length)
    captions = ["a red circle", "two blue squares"]
    ids, _ = tok.batch(captions)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        logits, _plan = model(images, ids)
        loss = caption_ce(logits, ids, 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert caption_images(model, images, tok, max_new_tokens=30) == captions


def test_encode_caches_the_query_encoding_until_the_weights_change() -> None:
    """PlanEncoder.encode (evaluation, serving) equals the training forward and recomputes the cached
    query encoding after an optimizer step or a load_state_dict, never serving stale weights."""
    model = randomize(debug_model())
    encoder = model.encoder
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    fresh = encoder(images).detach()  # grad mode: the query goes through the text encoder each call
    assert encoder._query_cache is None
    assert torch.allclose(encoder.encode(images, batch_size=2), fresh, atol=1e-5)  # chunks of 2: same values
    cached = encoder._query_cache[1]
    encoder.encode(images)
    assert encoder._query_cache[1] is cached  # reused, not recomputed

    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.5)
    encoder(images).square().mean().backward()
    optimizer.step()
    after_step = encoder(images).detach()
    assert not torch.allclose(after_step, fresh)
    assert torch.equal(encoder.encode(images), after_step)

    other = randomize(debug_model(seed=4), seed=7)
    encoder.load_state_dict(other.encoder.state_dict())
    assert torch.equal(encoder.encode(images), other.encoder(images).detach())
    with torch.inference_mode():  # how Serve calls it; the cache then still works without inference mode
        served = encoder.encode(images)
    assert torch.equal(served, encoder.encode(images))
    assert encoder.encode(images[:0]).shape == (0, *fresh.shape[1:])


def test_encode_works_on_weights_created_under_inference_mode() -> None:
    """Inference tensors carry no version counter: encode then computes the query each call (no cache)."""
    with torch.inference_mode():
        model = randomize(debug_model())
        images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        expected = model.encoder(images)
    assert torch.equal(model.encoder.encode(images), expected)
    assert model.encoder._query_cache is None
