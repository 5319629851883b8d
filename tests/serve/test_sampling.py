"""The decoder's failure isolation and the encoder's decode memory, in-process (no Ray): fast regression tests.

Temperatures below ~1e-38 made softmax(logits / T) NaN and torch.multinomial raise for the whole batch;
a 16-bit image was widened to whole-image int64 arrays (8 bytes a pixel, several at once) before scaling.
"""

from __future__ import annotations

import io
import math
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import load_decoder
from model.generation import generate
from model.transform import ImageTransform, sixteen_to_eight
from serve.deployments import PlanDecoder
from tests.serve.conftest import ServeFixtures


def test_tiny_temperatures_sample_like_greedy_and_never_nan() -> None:
    torch.manual_seed(0)
    from model.config import load_config
    from model.model import build_model

    decoder = build_model(load_config("debug").model).decoder.eval()
    plan = torch.randn(6, 4, 32)  # (B, K, D)
    greedy = generate(decoder, plan, max_new_tokens=12)
    for temperature in (1e-45, 1e-40, 1e-39, 1e-38, 1e-30, 1e-6):
        generator = torch.Generator().manual_seed(1)
        out = generate(decoder, plan, max_new_tokens=12, temperature=temperature, generator=generator)
        assert torch.equal(out, greedy), temperature
    warm = generate(decoder, plan, max_new_tokens=12, temperature=1.5, generator=torch.Generator().manual_seed(1))
    assert warm.shape[0] == 6
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            generate(decoder, plan, max_new_tokens=4, temperature=bad)


def test_a_row_that_fails_never_fails_its_batch_neighbours(serve_fixtures: ServeFixtures) -> None:
    """A NaN plan makes multinomial raise; the rows decoded with it in one batch still get their captions."""
    replica = PlanDecoder.func_or_class(str(serve_fixtures.model.path))
    part = load_decoder(serve_fixtures.model.path)
    good = torch.zeros(4, 32)  # (K, D)
    bad = torch.full((4, 32), float("nan"))
    requests = [(good, 6, 1.0), (bad, 6, 1.0), (good, 6, 1.0), (good, 6, 0.0)]
    out = replica.captions(requests)
    assert isinstance(out[1], Exception), out
    assert all(isinstance(text, str) for i, text in enumerate(out) if i != 1), out
    expected_greedy = replica.tokenizer.decode(generate(part.module, good[None], max_new_tokens=6)[0])
    assert out[3] == expected_greedy


def _png16(side: int) -> bytes:
    values = (np.arange(side * side, dtype=np.uint32) % 65536).astype(np.uint16).reshape(side, side)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def test_sixteen_bit_decode_is_exact_and_memory_bounded() -> None:
    values = np.array([[0, 1, 128, 129, 32767, 32896], [65534, 65535, 257, 1000, 40000, 12345]], dtype=np.uint16)
    expected = (values.astype(np.int64) * 255 + 32767) // 65535  # the rounding rule, in wide integers
    assert np.array_equal(sixteen_to_eight(values, rows_per_block=1), expected)
    assert np.array_equal(sixteen_to_eight(values.astype(np.int32) - 5).astype(np.int64)[0, :2], [0, 0])

    data = _png16(4096)  # 16.8 MP, the service's pixel guard; 32 MB as uint16
    transform = ImageTransform(32, max_pixels=4096 * 4096)
    tracemalloc.start()
    try:
        x = transform(data)  # (3, 32, 32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert x.shape == (3, 32, 32)
    # Python/numpy allocations only (Pillow's own buffers are not traced): the uint16 view and the uint8
    # result (~48 MB); the int64 path allocated 4 x 134 MB.
    assert peak < 96 * 2**20, f"peak {peak / 2**20:.0f} MiB"
