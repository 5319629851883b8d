"""The two model halves as Serve deployments, each scaled on its own.

    PlanEncoder: image bytes -> (decode, resize, normalise) -> batch (B, 3, S, S) -> plan (B, K, D) -> codec bytes
    PlanDecoder: codec bytes -> plan (K, D) -> batch (B, K, D) -> KV-cached generation -> caption

Per-request work that can fail on bad input (image decoding, plan parsing, parameter checks) happens
before a request joins a batch, so one bad request never fails its batch neighbours. Image decoding runs
in a worker thread; the batched model call runs on the replica's user-code event loop on purpose. Handed
to a thread, the Python-heavy generation loop held the GIL against the thread that admits requests, so
batches stayed at 1-3 requests under 32 concurrent clients (1.2x from batching); run inline, requests
pile up while a batch computes and the next batch takes them all (3.4-4x, benchmarks/RESULTS.md). Serve
answers health checks on its own loop meanwhile. Batch sizes come from `user_config` and are applied in
`reconfigure()`, so `serve deploy` can change them without restarting replicas.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import torch
from ray import serve

from model.checkpoint import load_decoder, load_encoder
from model.codec import HEADER_SIZE, decode_plan, encode_plan, plan_nbytes
from model.generation import generate
from model.tokenizer import ByteTokenizer
from model.transform import ImageTransform
from serve.loading import ResolvedModel, resolve_model

log = logging.getLogger("ray.serve")
MAX_TEMPERATURE = 2.0


class ParameterError(ValueError):
    """A sampling parameter outside what the decoder accepts (HTTP 422)."""


def _batch_settings(user_config: dict[str, Any] | None) -> tuple[int, float]:
    cfg = dict(user_config or {})
    unknown = sorted(set(cfg) - {"max_batch_size", "batch_wait_timeout_s"})
    if unknown:
        raise ValueError(f"unknown user_config key(s) {unknown}; valid: max_batch_size, batch_wait_timeout_s")
    size, wait = int(cfg.get("max_batch_size", 16)), float(cfg.get("batch_wait_timeout_s", 0.005))
    if size < 1 or wait < 0:
        raise ValueError(f"user_config needs max_batch_size >= 1 and batch_wait_timeout_s >= 0, got {cfg}")
    return size, wait


def _load(source: str, tracking_uri: str | None, torch_threads: int) -> ResolvedModel:
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    return resolve_model(source, tracking_uri=tracking_uri)


@serve.deployment(
    name="PlanEncoder",
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=64,
    max_queued_requests=256,
    user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.005},
)
class PlanEncoder:
    """Image encoder, text encoder, fusion and predictor: image bytes -> plan bytes."""

    def __init__(
        self,
        source: str,
        tracking_uri: str | None = None,
        torch_threads: int = 0,
        max_pixels: int = 64_000_000,
        plan_dtype: str = "fp16",
    ) -> None:
        self.resolved = _load(source, tracking_uri, torch_threads)
        part = load_encoder(self.resolved.path)
        self.resolved.release()
        self.encoder, self.cfg, self.fingerprint = part.module, part.config.model, part.fingerprint
        self.plan_dtype = plan_dtype
        self.transform = ImageTransform(self.cfg.image_size, max_pixels=max_pixels)
        # The query prompt never changes, so its text encoding is computed once here, not per request.
        with torch.inference_mode():
            self.query = None if self.encoder.text is None else self.encoder.text(self.encoder.query_ids)  # (1, S, D)
        log.info("PlanEncoder serving %s (fingerprint %s)", self.resolved.source, self.fingerprint)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        size, wait = _batch_settings(user_config)
        self._encode_batch.set_max_batch_size(size)
        self._encode_batch.set_batch_wait_timeout_s(wait)

    def info(self) -> dict[str, Any]:
        k, d = self.cfg.plan_len, self.cfg.plan_dim  # plan_dim: model.wire_dim when set
        return {
            "name": self.resolved.name,
            "version": self.resolved.version,
            "source": self.resolved.source,
            "fingerprint": self.fingerprint,
            "K": k,
            "D": d,
            "dtype": self.plan_dtype,
            "plan_bytes": HEADER_SIZE + plan_nbytes(k, d, self.plan_dtype),
            "image_size": self.cfg.image_size,
            "max_pixels": self.transform.max_pixels,
            "conditioning": self.cfg.conditioning,
            "bottleneck": self.cfg.bottleneck,
        }

    async def encode(self, image: bytes) -> bytes:
        """Image bytes -> plan bytes; raises model.transform.ImageDecodeError for a bad image."""
        pixels = await asyncio.to_thread(self.transform, image)  # (3, S, S); decoding is per request
        return await self._encode_batch(pixels)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _encode_batch(self, images: list[torch.Tensor]) -> list[bytes]:
        plans = self.plans(torch.stack(images))  # (B, K, D)
        return [encode_plan(p, fingerprint=self.fingerprint, dtype=self.plan_dtype) for p in plans]

    @torch.inference_mode()  # grad mode is per thread: set it on the thread that runs the model
    def plans(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, K, D): PlanEncoder.forward with the cached query encoding."""
        patches = self.encoder.vision(images)  # (B, N, D)
        if self.query is None:  # bottleneck == "none": the patches are the plan
            return self.encoder.to_wire(patches)
        fused = self.encoder.fusion(self.query.expand(images.shape[0], -1, -1), patches)  # (B, S, D)
        return self.encoder.to_wire(self.encoder.predictor(fused))  # (B, K, plan_dim)


@serve.deployment(
    name="PlanDecoder",
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=64,
    max_queued_requests=256,
    user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.005},
)
class PlanDecoder:
    """Text decoder: plan bytes -> caption, greedy or sampled, with the KV cache."""

    def __init__(self, source: str, tracking_uri: str | None = None, torch_threads: int = 0) -> None:
        self.resolved = _load(source, tracking_uri, torch_threads)
        part = load_decoder(self.resolved.path)
        self.resolved.release()
        self.decoder, self.cfg, self.fingerprint = part.module, part.config.model, part.fingerprint
        self.tokenizer = ByteTokenizer(self.cfg.max_seq_length)
        self.max_new_tokens = self.cfg.max_seq_length - 1  # BOS takes the first position
        self.generator = torch.Generator().manual_seed(torch.seed())
        log.info("PlanDecoder serving %s (fingerprint %s)", self.resolved.source, self.fingerprint)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        size, wait = _batch_settings(user_config)
        self._decode_batch.set_max_batch_size(size)
        self._decode_batch.set_batch_wait_timeout_s(wait)

    def info(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "max_new_tokens": self.max_new_tokens}

    async def decode(self, plan_bytes: bytes, max_new_tokens: int | None = None, temperature: float = 0.0) -> str:
        """Plan bytes -> caption; raises model.codec.PlanError or ParameterError for bad input."""
        limit = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if not 1 <= limit <= self.max_new_tokens:
            raise ParameterError(f"max_new_tokens={limit} is outside [1, {self.max_new_tokens}]")
        if not 0.0 <= temperature <= MAX_TEMPERATURE:
            raise ParameterError(f"temperature={temperature} is outside [0, {MAX_TEMPERATURE}]")
        plan = decode_plan(
            plan_bytes, expect_k=self.cfg.plan_len, expect_d=self.cfg.plan_dim, expect_fingerprint=self.fingerprint
        )  # (K, D)
        return await self._decode_batch((plan, limit, float(temperature)))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _decode_batch(self, requests: list[tuple[torch.Tensor, int, float]]) -> list[str]:
        return self.captions(requests)

    @torch.inference_mode()
    def captions(self, requests: list[tuple[torch.Tensor, int, float]]) -> list[str]:
        """One generate() call per distinct temperature; each row is cut to its own length limit.

        Rows of a batch never interact (each reads only its own plan and tokens), so decoding a row
        in a batch to the group's longest limit and cutting it gives what a solo call would give.
        """
        out: list[str] = [""] * len(requests)
        groups: dict[float, list[int]] = {}
        for i, (_, _, temperature) in enumerate(requests):
            groups.setdefault(temperature, []).append(i)
        for temperature, rows in groups.items():
            plans = torch.stack([requests[i][0] for i in rows])  # (b, K, D)
            longest = max(requests[i][1] for i in rows)
            tokens = generate(
                self.decoder, plans, max_new_tokens=longest, temperature=temperature, generator=self.generator
            )  # (b, <= longest)
            for row, i in enumerate(rows):
                out[i] = self.tokenizer.decode(tokens[row, : requests[i][1]])
        return out
