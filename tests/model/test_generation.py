"""Generation: the KV cache gives the same tokens as full recomputation; rows stop at EOS."""

from __future__ import annotations

import pytest
import torch

from model.config import load_config
from model.generation import caption_images, generate, strip_special
from model.model import VLJEPA, build_model
from model.tokenizer import EOS, PAD, ByteTokenizer

CASES = [
    ("cross_attn", "plan"),
    ("gated", "plan"),
    ("prefix_film", "plan"),
    ("cross_attn", "none"),
    ("prefix_film", "none"),
]


def make_model(conditioning: str = "cross_attn", bottleneck: str = "plan", seed: int = 0) -> VLJEPA:
    torch.manual_seed(seed)
    model = build_model(
        load_config("debug", [f"--model.conditioning={conditioning}", f"--model.bottleneck={bottleneck}"]).model
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # leave the identity/zero inits so every conditioning path matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def boost_eos(model: VLJEPA, amount: float) -> None:
    """Raise the EOS logit so rows end at different steps (applies to both decoding paths)."""

    def hook(_module, _inputs, logits):
        bump = torch.zeros(logits.shape[-1])
        bump[EOS] = amount
        return logits + bump

    model.decoder.head.register_forward_hook(hook)


def plan_for(model: VLJEPA, b: int = 5) -> torch.Tensor:
    images = torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model.encoder(images)


@pytest.mark.parametrize(("conditioning", "bottleneck"), CASES)
def test_cache_matches_full_recompute_greedy_and_sampled(conditioning: str, bottleneck: str) -> None:
    model = make_model(conditioning, bottleneck)
    plan = plan_for(model)
    greedy = generate(model.decoder, plan, max_new_tokens=30)
    assert greedy.shape == (5, 30)
    assert torch.equal(greedy, generate(model.decoder, plan, max_new_tokens=30, use_cache=False))
    boost_eos(model, 3.0)  # sampled rows then end at different steps, exercising per-row stops
    runs = [
        generate(
            model.decoder,
            plan,
            max_new_tokens=30,
            temperature=0.8,
            generator=torch.Generator().manual_seed(11),
            use_cache=use_cache,
        )
        for use_cache in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])
    other_seed = generate(
        model.decoder, plan, max_new_tokens=30, temperature=0.8, generator=torch.Generator().manual_seed(12)
    )
    assert not torch.equal(runs[0], other_seed)


def test_rows_stop_at_eos_and_are_padded() -> None:
    model = make_model()
    boost_eos(model, 4.0)
    plan = plan_for(model, b=8)
    tokens = generate(
        model.decoder, plan, max_new_tokens=40, temperature=1.0, generator=torch.Generator().manual_seed(0)
    )
    ended = 0
    for row in tokens.tolist():
        if EOS in row:
            ended += 1
            after = row[row.index(EOS) + 1 :]
            assert all(t == PAD for t in after)
        assert PAD not in row[: row.index(EOS) if EOS in row else len(row)]
    assert ended >= 2
    lengths = {len(r) for r in strip_special(tokens)}
    assert len(lengths) > 1, "rows end at different steps"
    if ended == len(tokens):  # everyone finished: decoding stopped at the last EOS
        assert (tokens[:, -1] == EOS).any()


def test_generation_stops_when_every_row_has_ended() -> None:
    model = make_model()
    boost_eos(model, 1e4)
    tokens = generate(model.decoder, plan_for(model), max_new_tokens=20)
    assert tokens.tolist() == [[EOS]] * 5


def test_length_is_capped_by_the_position_table_and_bad_arguments_raise() -> None:
    model = make_model()
    plan = plan_for(model, b=2)
    assert generate(model.decoder, plan, max_new_tokens=500).shape[1] <= model.cfg.max_seq_length - 1
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model.decoder, plan, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model.decoder, plan, max_new_tokens=3, temperature=-1.0)
    with pytest.raises(ValueError, match=r"plan must be \(B, 4, D\)"):
        generate(model.decoder, plan[:, :2], max_new_tokens=3)


def test_caption_images_decodes_strings_and_restores_mode() -> None:
    model = make_model().train()
    images = torch.randn(3, 3, 16, 16)
    captions = caption_images(model, images, ByteTokenizer(model.cfg.max_seq_length), max_new_tokens=12)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert model.training
    again = caption_images(model, images, ByteTokenizer(model.cfg.max_seq_length), max_new_tokens=12)
    assert again == captions  # greedy in eval mode is deterministic
