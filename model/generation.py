"""Autoregressive decoding from a plan: greedy or temperature sampling, with a key/value cache.

The cached path feeds one token per step through `TextDecoder.step`; the reference path
(`use_cache=False`) recomputes the whole sequence every step, as the log's original code did.
Both draw from the generator identically (one multinomial call per step over the whole batch),
so with the same seed they return the same tokens, which the tests check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from model.model import VLJEPA, TextDecoder
from model.tokenizer import BOS, EOS, PAD

# Below this, softmax(logits / T) puts all its mass on the argmax for any logit gap above ~1e-2 (e^-100),
# so sampling is greedy decoding with extra steps; and T -> 0 is where float32 division overflows.
MIN_SAMPLING_TEMPERATURE = 1e-4


class _Decodes(Protocol):
    def decode_batch(self, ids: Tensor) -> list[str]: ...


@torch.no_grad()
def generate(
    decoder: TextDecoder,
    plan: Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Tensor:
    """plan (B, P, D) -> tokens after BOS (B, <= max_new_tokens) long.

    A row ends with its first EOS (kept) and is PAD afterwards (PAD and BOS are never sampled);
    decoding stops early once every row has ended. `max_new_tokens` is capped by the decoder's
    text positions (max_seq_length - 1).
    The caller chooses train/eval mode (plan and word dropout act only in training).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    steps = min(max_new_tokens, decoder.max_len - 1)
    B = plan.shape[0]
    ids = torch.full((B, 1), BOS, dtype=torch.long, device=plan.device)  # (B, 1 + generated)
    done = torch.zeros(B, dtype=torch.bool, device=plan.device)
    state = decoder.init_state(plan, steps + 1) if use_cache else None
    for _ in range(steps):
        if state is not None:
            logits = decoder.step(ids[:, -1:], state)[:, -1]  # (B, V): only the newest token is fed
        else:
            logits = decoder(plan, ids)[:, -1]  # (B, V): the whole prefix recomputed
        nxt = _pick(logits, temperature, generator)  # (B,)
        nxt = nxt.masked_fill(done, PAD)
        done = done | (nxt == EOS)
        ids = torch.cat([ids, nxt.unsqueeze(1)], dim=1)
        if bool(done.all()):
            break
    return ids[:, 1:]


def _pick(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """Greedy argmax, or one sample per row from softmax(logits / temperature): (B,).

    PAD and BOS are never emitted: PAD in the output then always means "this row has ended".
    """
    logits = logits.index_fill(-1, torch.tensor([PAD, BOS], device=logits.device), float("-inf"))
    if temperature < MIN_SAMPLING_TEMPERATURE:  # 0, or so cold that sampling is argmax anyway
        return logits.argmax(-1)
    # Shift each row's maximum to 0 before dividing: the scaled logits are then <= 0 with an exact 0 at the
    # top, so a tiny temperature gives -inf for the rest (never inf - inf = NaN) and softmax stays a distribution.
    logits = logits.float()
    scaled = (logits - logits.amax(-1, keepdim=True)) / temperature  # (B, V)
    probs = torch.softmax(scaled, dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def caption_images(
    model: VLJEPA,
    images: Tensor,
    tokenizer: _Decodes,
    *,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[str]:
    """images (B, 3, S, S) -> one caption per image, decoded in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        plan = model.encoder(images)  # (B, P, D)
        limit = max_new_tokens if max_new_tokens is not None else model.cfg.max_seq_length - 1
        tokens = generate(model.decoder, plan, max_new_tokens=limit, temperature=temperature, generator=generator)
    finally:
        model.train(was_training)
    return tokenizer.decode_batch(tokens)


def strip_special(tokens: Tensor) -> list[Sequence[int]]:
    """Rows of generated ids without EOS and padding (handy for metrics on raw ids)."""
    out = []
    for row in tokens.tolist():
        end = row.index(EOS) if EOS in row else len(row)
        out.append([t for t in row[:end] if t != PAD])
    return out
