"""The plan wire format: sizes, fp16/int8 round trips, and every rejection with its own error class."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from model.codec import (
    HEADER_SIZE,
    MAGIC,
    PlanDtypeError,
    PlanError,
    PlanFingerprintError,
    PlanFormatError,
    PlanLengthError,
    PlanShapeError,
    PlanValueError,
    PlanVersionError,
    decode_plan,
    encode_plan,
    parse_header,
    plan_nbytes,
)

FP = "0123456789abcdef"
K, D = 16, 256  # the log's seed config


def layer_normed_plan(k: int = K, d: int = D, seed: int = 0) -> torch.Tensor:
    """Plans leave the model through a LayerNorm, so values are O(1) per row."""
    x = torch.randn(k, d, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.layer_norm(x, (d,)) * (1 + torch.arange(k).unsqueeze(1) / k)


def test_sizes_at_the_seed_config():
    assert HEADER_SIZE == 18
    assert plan_nbytes(K, D) == 8192  # the log's "8KB"
    assert plan_nbytes(K, D, "int8") == K * 2 + K * D  # 4,128: about half
    data = encode_plan(layer_normed_plan(), fingerprint=FP)
    assert len(data) == HEADER_SIZE + 8192
    assert data[:4] == MAGIC
    assert len(encode_plan(layer_normed_plan(), fingerprint=FP, dtype="int8")) == HEADER_SIZE + 4128
    with pytest.raises(PlanDtypeError):
        plan_nbytes(K, D, "bf16")  # type: ignore[arg-type]


def test_header_fields_little_endian():
    data = encode_plan(layer_normed_plan(3, 5), fingerprint=FP.upper(), dtype="int8")
    assert data[4] == 1 and data[5] == 2  # version 1, dtype int8
    assert struct.unpack("<HH", data[6:10]) == (3, 5)
    assert data[10:18] == bytes.fromhex(FP)
    head = parse_header(data)
    assert (head.version, head.dtype, head.k, head.d, head.fingerprint) == (1, "int8", 3, 5, FP)


def test_fp16_round_trip_error_bound():
    plan = layer_normed_plan()
    out = decode_plan(encode_plan(plan, fingerprint=FP), expect_k=K, expect_d=D, expect_fingerprint=FP)
    assert out.dtype == torch.float32 and out.shape == (K, D)
    # fp16 has an 11-bit significand: relative error <= 2^-11 per value.
    assert ((out - plan).abs() <= plan.abs() * 2**-11 + 1e-7).all()
    assert torch.equal(out, plan.half().float())  # exactly the fp16 rounding, nothing more


def test_int8_round_trip_per_row_error_bound():
    plan = layer_normed_plan()
    plan[3] *= 100.0  # one loud row must not cost the quiet rows their precision
    out = decode_plan(encode_plan(plan, fingerprint=FP, dtype="int8"), expect_fingerprint=FP)
    assert out.shape == (K, D)
    absmax = plan.abs().amax(dim=1, keepdim=True)  # (K, 1)
    # Half a quantisation step of each row's own scale, plus the fp16 rounding of the scale itself.
    bound = absmax / 127 * 0.5 + absmax * 2**-10
    assert ((out - plan).abs() <= bound).all()
    quiet = torch.cat([plan[:3], plan[4:]])
    quiet_out = torch.cat([out[:3], out[4:]])
    assert (quiet_out - quiet).abs().max() < 0.05
    assert torch.equal(out.abs().amax(dim=1) > 0, absmax.squeeze(1) > 0)


def test_int8_all_zero_row_and_batch_of_one():
    plan = layer_normed_plan(4, 8)
    plan[2] = 0.0
    out = decode_plan(encode_plan(plan.unsqueeze(0), fingerprint=FP, dtype="int8"))  # (1, K, D) accepted
    assert out.shape == (4, 8)
    assert (out[2] == 0).all()


def test_encode_rejections():
    plan = layer_normed_plan(4, 8)
    bad = plan.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(PlanValueError, match="NaN"):
        encode_plan(bad, fingerprint=FP)
    bad[1, 1] = float("inf")
    with pytest.raises(PlanValueError):
        encode_plan(bad, fingerprint=FP, dtype="int8")
    with pytest.raises(PlanValueError, match="fp16"):
        encode_plan(plan * 1e6, fingerprint=FP)
    with pytest.raises(PlanShapeError, match=r"\(2, 4, 8\)"):
        encode_plan(torch.stack([plan, plan]), fingerprint=FP)
    with pytest.raises(PlanShapeError):
        encode_plan(torch.zeros(8), fingerprint=FP)
    with pytest.raises(PlanDtypeError, match="bf16"):
        encode_plan(plan, fingerprint=FP, dtype="bf16")  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="16 hex"):
        encode_plan(plan, fingerprint="xyz")


@pytest.fixture
def wire() -> bytes:
    return encode_plan(layer_normed_plan(), fingerprint=FP)


def test_rejects_too_short(wire):
    for data in (b"", wire[: HEADER_SIZE - 1]):
        with pytest.raises(PlanLengthError, match="header"):
            decode_plan(data)


def test_rejects_bad_magic(wire):
    with pytest.raises(PlanFormatError, match=r"expected b'VLJP', got b'PNG\\x00'"):
        decode_plan(b"PNG\x00" + wire[4:])


def test_rejects_version(wire):
    with pytest.raises(PlanVersionError, match="expected 1, got 2"):
        decode_plan(wire[:4] + bytes([2]) + wire[5:])


def test_rejects_dtype_code(wire):
    with pytest.raises(PlanDtypeError, match="got 7"):
        decode_plan(wire[:5] + bytes([7]) + wire[6:])


def test_rejects_wrong_length(wire):
    with pytest.raises(PlanLengthError, match=f"expected {HEADER_SIZE + 8192} bytes, got {HEADER_SIZE + 8191}"):
        decode_plan(wire[:-1])
    with pytest.raises(PlanLengthError):
        decode_plan(wire + b"\0\0")
    # A header that claims int8 over an fp16 payload is a length mismatch too.
    with pytest.raises(PlanLengthError, match="int8"):
        decode_plan(wire[:5] + bytes([2]) + wire[6:])


def test_rejects_shape_mismatch(wire):
    with pytest.raises(PlanShapeError, match="expected K=8, got K=16"):
        decode_plan(wire, expect_k=8)
    with pytest.raises(PlanShapeError, match="expected D=128, got D=256"):
        decode_plan(wire, expect_d=128)
    # Same byte count, different split: K=32, D=128 is still not this decoder's shape.
    reshaped = encode_plan(layer_normed_plan(32, 128), fingerprint=FP)
    assert len(reshaped) == len(wire)
    with pytest.raises(PlanShapeError, match="K=16, got K=32"):
        decode_plan(reshaped, expect_k=K, expect_d=D)
    with pytest.raises(PlanShapeError, match="K=0"):
        decode_plan(wire[:6] + struct.pack("<HH", 0, D) + wire[10:])


def test_rejects_fingerprint(wire):
    with pytest.raises(PlanFingerprintError, match=f"expected ffffffffffffffff .*got {FP}"):
        decode_plan(wire, expect_fingerprint="f" * 16)
    assert decode_plan(wire, expect_fingerprint=FP.upper()).shape == (K, D)  # hex case does not matter


def test_rejects_non_finite_payload(wire):
    nan_fp16 = struct.pack("<e", float("nan"))
    with pytest.raises(PlanValueError):
        decode_plan(wire[:HEADER_SIZE] + nan_fp16 + wire[HEADER_SIZE + 2 :])


def test_check_order_length_before_shape_before_fingerprint(wire):
    # Several things wrong at once: the earliest check in the documented order wins.
    with pytest.raises(PlanLengthError):
        decode_plan(wire[:-2], expect_k=8, expect_fingerprint="f" * 16)
    with pytest.raises(PlanShapeError):
        decode_plan(wire, expect_k=8, expect_fingerprint="f" * 16)
    for cls in (PlanLengthError, PlanFormatError, PlanVersionError, PlanDtypeError, PlanShapeError):
        assert issubclass(cls, PlanError) and issubclass(cls, ValueError)
    assert issubclass(PlanFingerprintError, PlanError)


# --- int8 on a trained model: greedy captions rarely change -----------------------

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
    "black": (15, 15, 15),
    "cyan": (40, 210, 220),
}


def coloured_squares(n: int, seed: int) -> tuple[list, list[str]]:
    """n images of a coloured square (random size, place, off-white background) and captions "a red square"."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images, captions = [], []
    for i in range(n):
        name = list(COLOURS)[i % len(COLOURS)]
        img = Image.new("RGB", (32, 32), tuple(int(v) for v in rng.integers(225, 256, 3)))
        size = int(rng.integers(16, 28))
        x, y = (int(v) for v in rng.integers(0, 32 - size, 2))
        ImageDraw.Draw(img).rectangle((x, y, x + size, y + size), fill=COLOURS[name])
        images.append(img)
        captions.append(f"a {name} square")
    return images, captions


@pytest.fixture(scope="module")
def trained_debug_checkpoint(tmp_path_factory):
    """The `debug` preset trained in-process (~300 steps) until its greedy captions name each colour."""
    import torch.nn.functional as F

    from model.checkpoint import save_model
    from model.config import load_config
    from model.model import build_model
    from model.tokenizer import PAD, ByteTokenizer
    from model.transform import ImageTransform

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread avoids spin contention on a busy 2-core machine
    try:
        torch.manual_seed(0)
        cfg = load_config("debug")
        transform = ImageTransform(cfg.model.image_size)
        tokenizer = ByteTokenizer(cfg.model.max_seq_length)
        images, captions = coloured_squares(512, seed=0)
        x = torch.stack([transform(img) for img in images])  # (N, 3, S, S)
        ids, _ = tokenizer.batch(captions)  # (N, T)
        model = build_model(cfg.model)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        for _ in range(300):
            idx = torch.randint(0, len(x), (32,), generator=gen)
            logits = model(x[idx], ids[idx, :-1]).logits  # (B, T-1, V) predicts ids[:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[idx, 1:].reshape(-1), ignore_index=PAD)
            opt.zero_grad()
            loss.backward()
            opt.step()
        path = tmp_path_factory.mktemp("trained") / "debug.safetensors"
        save_model(path, model, cfg)
        yield path
    finally:
        torch.set_num_threads(threads)


def test_int8_rarely_changes_greedy_captions(trained_debug_checkpoint):
    from model.checkpoint import load_decoder, load_encoder
    from model.generation import generate
    from model.tokenizer import ByteTokenizer
    from model.transform import ImageTransform

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        enc, dec = load_encoder(trained_debug_checkpoint), load_decoder(trained_debug_checkpoint)
        m = enc.config.model
        transform, tokenizer = ImageTransform(m.image_size), ByteTokenizer(m.max_seq_length)
        images, references = coloured_squares(64, seed=1)  # unseen draws
        with torch.no_grad():
            plans = enc.module(torch.stack([transform(img) for img in images]))  # (64, K, D)
            received = {}
            for dtype in ("fp16", "int8"):
                wire = [encode_plan(p, fingerprint=enc.fingerprint, dtype=dtype) for p in plans]
                received[dtype] = torch.stack(
                    [
                        decode_plan(w, expect_k=m.plan_len, expect_d=m.embed_dim, expect_fingerprint=dec.fingerprint)
                        for w in wire
                    ]
                )
            captions = {
                dtype: tokenizer.decode_batch(generate(dec.module, plan, max_new_tokens=32))
                for dtype, plan in received.items()
            }
    finally:
        torch.set_num_threads(threads)

    # The model is really trained: captions name the colour and differ from image to image.
    fp16, int8 = captions["fp16"], captions["int8"]
    assert np.mean([c == r for c, r in zip(fp16, references, strict=True)]) >= 0.9, fp16[:8]
    assert len(set(fp16)) == len(COLOURS)
    # int8 perturbs every plan, yet changes at most 5% of the greedy captions.
    assert (received["int8"] - received["fp16"]).abs().max() > 0
    changed = np.mean([a != b for a, b in zip(fp16, int8, strict=True)])
    assert changed <= 0.05, [(a, b) for a, b in zip(fp16, int8, strict=True) if a != b]
