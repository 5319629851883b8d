"""Serving a model with a transport projection (model.wire_dim) and a packed plan dtype, without Ray.

The deployments' model code runs in-process here (their batching needs a replica, so the batch
bodies `plans` and `captions` are called directly): the encoder ships wire_dim-wide int4 plans and
the decoder expects exactly that width.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from model.checkpoint import load_model, save_model
from model.codec import HEADER_SIZE, PlanShapeError, decode_plan, encode_plan, plan_nbytes
from model.config import load_config
from model.generation import generate
from model.model import build_model
from model.tokenizer import ByteTokenizer
from serve.app import AppArgs
from serve.deployments import PlanDecoder, PlanEncoder


@pytest.fixture(scope="module")
def wire_checkpoint(tmp_path_factory):
    cfg = load_config("debug", ["--model.wire_dim=8"])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wire") / "wire.safetensors"
    save_model(path, build_model(cfg.model), cfg)
    return path


def test_encoder_ships_and_decoder_reads_wire_dim_plans(wire_checkpoint):
    enc = PlanEncoder(str(wire_checkpoint), plan_dtype="int4")  # the Ingress's encoder half
    dec = PlanDecoder.func_or_class(str(wire_checkpoint))
    info = enc.info()
    assert (info["K"], info["D"], info["dtype"]) == (4, 8, "int4")
    assert info["plan_bytes"] == HEADER_SIZE + plan_nbytes(4, 8, "int4") == 18 + 8 + 16
    whole = load_model(wire_checkpoint).model
    images = torch.randn(3, 3, 16, 16)
    plans = enc.plans(images)  # the deployment's forward with its cached query encoding
    with torch.no_grad():
        assert torch.allclose(plans, whole.encoder(images), atol=1e-6)
    wire = [encode_plan(p, fingerprint=enc.fingerprint, dtype=enc.plan_dtype) for p in plans]
    received = [decode_plan(w, expect_k=4, expect_d=dec.cfg.plan_dim, expect_fingerprint=dec.fingerprint) for w in wire]
    served = dec.captions([(p, 10, 0.0) for p in received])
    tokens = generate(whole.decoder, torch.stack(received), max_new_tokens=10)
    assert served == ByteTokenizer(whole.cfg.max_seq_length).decode_batch(tokens)
    # A plan of the model's full width is not what this decoder reads: a precise 422-class error.
    full = encode_plan(torch.zeros(4, 32), fingerprint=dec.fingerprint)
    try:  # returned as a Rejected("invalid_plan", ...) for the ingress to map, or raised by older deployments
        result = asyncio.run(dec.decode(full))
    except PlanShapeError as exc:
        result = exc
    assert "plan D mismatch: expected D=8, got D=32" in str(getattr(result, "detail", result))


def test_app_args_accept_the_packed_dtypes():
    for dtype in ("int4", "int3", "int2"):
        assert AppArgs.model_validate({"plan_dtype": dtype}).plan_dtype == dtype
    with pytest.raises(ValueError, match="plan_dtype"):
        AppArgs.model_validate({"plan_dtype": "int5"})
