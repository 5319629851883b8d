"""Loss terms: each switches with its weight, gradients reach the encoder, the EMA target follows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.config import ObjectiveConfig, load_config
from model.model import VLJEPA, build_model, trainable_parameters
from model.objectives import (
    Objective,
    caption_ce,
    category_loss,
    info_nce,
    plan_diversity,
    random_patch_mask,
    references_ce,
)
from model.tokenizer import ByteTokenizer


def make_model(*overrides: str) -> VLJEPA:
    torch.manual_seed(0)
    return build_model(load_config("debug", list(overrides)).model)


def make_batch(b: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    texts = ["a dog on a sofa", "xyz", "two zebras", "an empty road at night"][:b]
    ids, mask = ByteTokenizer(48).batch(texts)
    return images, ids, mask


def objective(model: VLJEPA, **weights: float | str) -> Objective:
    cfg = ObjectiveConfig(diversity_weight=0.0, jepa_weight=0.0, infonce_weight=0.0)
    for key, value in weights.items():
        setattr(cfg, key, value)
    return Objective(model, cfg)


# ---------------------------------------------------------------------------
# Switching terms with their weights


def test_ce_only_when_every_extra_weight_is_zero() -> None:
    obj = objective(make_model())
    out = obj(*make_batch())
    assert set(out) == {"loss", "ce", "diversity"}
    assert torch.equal(out["loss"], out["ce"])


@pytest.mark.parametrize(
    ("weights", "term"),
    [
        ({"diversity_weight": 0.5}, "diversity"),
        ({"jepa_weight": 0.7, "jepa_target": "ema_plan"}, "jepa"),
        ({"jepa_weight": 0.7, "jepa_target": "text"}, "jepa"),
        ({"infonce_weight": 0.3}, "infonce"),
    ],
)
def test_each_term_enters_the_loss_with_its_weight(weights: dict, term: str) -> None:
    obj = objective(make_model(), **weights)
    torch.manual_seed(0)
    out = obj(*make_batch())
    assert term in out and out[term].ndim == 0 and torch.isfinite(out[term])
    weight = next(v for k, v in weights.items() if k.endswith("_weight"))
    assert out["loss"].item() == pytest.approx(out["ce"].item() + weight * out[term].item(), rel=1e-5)
    assert out[term].item() != 0.0


def test_text_objectives_need_the_text_encoder() -> None:
    model = make_model("--model.bottleneck=none")
    with pytest.raises(ValueError, match="bottleneck=none"):
        objective(model, infonce_weight=1.0)
    with pytest.raises(ValueError, match="bottleneck=none"):
        objective(model, jepa_weight=1.0, jepa_target="text")
    out = objective(model, jepa_weight=1.0, jepa_target="ema_plan")(*make_batch())  # patches predict patches
    assert torch.isfinite(out["jepa"])


# ---------------------------------------------------------------------------
# The terms themselves


def test_ce_ignores_padding_and_applies_label_smoothing() -> None:
    logits = torch.randn(2, 5, 260)
    ids = torch.tensor([[1, 10, 11, 2, 0], [1, 12, 2, 0, 0]])
    real = ids[:, 1:] != 0
    expected = F.cross_entropy(logits[:, :-1][real], ids[:, 1:][real])
    assert caption_ce(logits, ids, 0.0).item() == pytest.approx(expected.item(), rel=1e-6)
    noisy = logits.clone()
    noisy[1, 3] += 100.0  # predicts a PAD target: must not matter
    assert caption_ce(noisy, ids, 0.0).item() == pytest.approx(expected.item(), rel=1e-6)
    assert caption_ce(logits, ids, 0.1).item() != pytest.approx(expected.item(), rel=1e-3)


def test_diversity_is_mean_off_diagonal_cosine() -> None:
    same = torch.ones(3, 4, 8)
    assert plan_diversity(same).item() == pytest.approx(1.0)
    eye = torch.eye(4).unsqueeze(1).expand(4, 2, 4)  # pooled plans are orthogonal one-hots
    assert plan_diversity(eye).item() == pytest.approx(0.0, abs=1e-7)
    assert plan_diversity(torch.randn(1, 4, 8)).item() == 0.0


def test_info_nce_rewards_matched_pairs() -> None:
    z = torch.eye(4)
    assert info_nce(z, z, 0.07).item() < 1e-3
    assert info_nce(z, z.roll(1, 0), 0.07).item() > 5.0


def test_random_patch_mask_hides_the_configured_share() -> None:
    mask = random_patch_mask(6, 64, 0.5)
    assert mask.shape == (6, 64) and (mask.sum(1) == 32).all()
    assert not torch.equal(mask[0], mask[1])


# ---------------------------------------------------------------------------
# Gradients and the EMA target


@pytest.mark.parametrize("bottleneck", ["plan", "none"])
def test_caption_loss_trains_the_encoder_through_the_plan(bottleneck: str) -> None:
    model = make_model(f"--model.bottleneck={bottleneck}")
    objective(model)(*make_batch())["loss"].backward()
    assert model.encoder.vision.patch_embed.weight.grad.abs().sum() > 0
    if bottleneck == "plan":
        assert model.encoder.predictor.queries.grad.abs().sum() > 0
        assert model.encoder.text.tok_embed.weight.grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"


def test_jepa_target_encoder_is_outside_the_model_and_frozen() -> None:
    model = make_model()
    before = trainable_parameters(model)
    keys = set(model.state_dict())
    obj = objective(model, jepa_weight=1.0)
    assert trainable_parameters(model) == before and set(model.state_dict()) == keys
    assert not any(p.requires_grad for p in obj.ema_encoder.parameters())
    obj.train()
    assert not obj.ema_encoder.training
    obj(*make_batch())["jepa"].backward()
    assert all(p.grad is None for p in obj.ema_encoder.parameters())
    assert model.encoder.vision.patch_embed.weight.grad.abs().sum() > 0


def test_update_ema_moves_target_toward_online() -> None:
    model = make_model()
    obj = objective(model, jepa_weight=1.0, ema_decay=0.9)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))  # stands in for optimizer steps

    def distance() -> float:
        pairs = zip(obj.ema_encoder.parameters(), model.encoder.parameters(), strict=True)
        return sum((t - o).pow(2).sum().item() for t, o in pairs) ** 0.5

    d0 = distance()
    obj.update_ema()
    assert distance() == pytest.approx(0.9 * d0, rel=1e-4)
    objective(make_model()).update_ema()  # no EMA target: a no-op


def test_text_target_is_stop_grad_but_infonce_trains_the_text_tower() -> None:
    # 'x', 'y', 'z' bytes occur in captions but not in the query prompt "describe the image".
    rows = [ord(c) + 4 for c in "xyz"]
    for weights, expect_grad in (({"jepa_weight": 1.0, "jepa_target": "text"}, False), ({"infonce_weight": 1.0}, True)):
        model = make_model()
        out = objective(model, **weights)(*make_batch())
        term = "jepa" if "jepa_weight" in weights else "infonce"
        out[term].backward()
        grad = model.encoder.text.tok_embed.weight.grad
        assert bool(grad[rows].abs().sum() > 0) is expect_grad


# ---------------------------------------------------------------------------
# The category term (the log's Run-0 classification as a training signal)


def test_category_loss_is_cross_entropy_with_shared_mass() -> None:
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    one = torch.zeros(4, 6)
    one[torch.arange(4), torch.tensor([0, 3, 5, 2])] = 1
    assert torch.allclose(category_loss(logits, one), F.cross_entropy(logits, torch.tensor([0, 3, 5, 2])))
    # two categories share the mass; an unlabelled row is left out of the mean
    two = torch.tensor([[1.0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    expected = -(0.5 * F.log_softmax(logits[0], -1)[:2]).sum()
    assert torch.allclose(category_loss(logits[:2], two), expected)
    none = category_loss(logits.requires_grad_(), torch.zeros(4, 6))
    assert none.item() == 0.0 and none.requires_grad


def test_category_head_trains_the_encoder_but_stays_out_of_the_model() -> None:
    model = make_model()
    before = trainable_parameters(model)
    obj = objective(model, category_weight=0.5, num_categories=7)
    assert obj.needs_categories and trainable_parameters(model) == before  # checkpoints keep their size
    assert not any(k.startswith("category_head") for k in model.state_dict())
    images, ids, mask = make_batch()
    cats = F.one_hot(torch.tensor([1, 2, 6, 1]), 7).float()
    out = obj(images, ids, mask, cats)
    assert torch.allclose(out["loss"], out["ce"] + 0.5 * out["category"])
    out["category"].backward()
    assert obj.category_head.weight.grad.abs().sum() > 0
    assert model.encoder.vision.patch_embed.weight.grad.abs().sum() > 0  # through the plan
    assert model.decoder.head.weight.grad is None  # the decoder plays no part in this term
    with pytest.raises(ValueError, match=r"needs categories of shape \(4, 7\).*got \(4, 6\)"):
        obj(images, ids, mask, cats[:, :6])
    with pytest.raises(ValueError, match="got None"):
        obj(images, ids, mask)


def test_references_ce_is_per_token_over_all_pairs_whatever_the_batching() -> None:
    """The one CE home of val_ce and final_ce: token-weighted over (image, reference) pairs, capped
    per image and cut to max_chars as training cuts captions."""
    model = make_model().eval()
    plans = model.encoder.encode(torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    refs = [[f"caption {i} {j}" + "!" * (7 * i + j) for j in range(7)] for i in range(3)]  # 7 refs per image
    refs[1] = ["x"]  # one short reference

    def direct(per_image: int, max_chars: int, smoothing: float) -> float:
        pairs = [(i, r[:max_chars]) for i, rs in enumerate(refs) for r in rs[:per_image]]
        ids, _ = ByteTokenizer(model.cfg.max_seq_length).batch([t for _, t in pairs])
        logits = model.decoder(plans[[i for i, _ in pairs]], ids)
        return caption_ce(logits, ids, smoothing).item()  # one batch: the mean over every target token

    with torch.no_grad():
        plain, smoothed = references_ce(model.decoder, plans, refs, max_chars=12, label_smoothing=(0.0, 0.1))
        assert plain == pytest.approx(direct(5, 12, 0.0), rel=1e-5)
        assert smoothed == pytest.approx(direct(5, 12, 0.1), rel=1e-5)
        assert plain != pytest.approx(direct(7, 12, 0.0), rel=1e-4)  # the 6th and 7th references are left out
        (long,) = references_ce(model.decoder, plans, refs, max_chars=40)
        assert long == pytest.approx(direct(5, 40, 0.0), rel=1e-5)
    nan = references_ce(model.decoder, plans, [[], [], []], max_chars=12)
    assert len(nan) == 1 and nan[0] != nan[0]
