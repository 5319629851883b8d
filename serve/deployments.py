"""The two model halves: the encoder, held by the HTTP replica, and the decoder, a deployment of its own.

    PlanEncoder: image bytes -> (decode, resize, normalise) -> batch (B, 3, S, S) -> plan (B, K, D) -> codec bytes
                 (not a deployment: serve.ingress.Ingress holds one per replica, so an image is encoded where
                 it arrives and only the plan makes a handle call)
    PlanDecoder: codec bytes -> plan (K, D) -> batch (B, K, D) -> KV-cached generation -> caption

Per-request work that can fail on bad input (image decoding, plan parsing, parameter checks) happens
before a request joins a batch, and a batch that fails anyway is re-run row by row, so one bad request
never fails its batch neighbours. A client's mistake is *returned* as a `Rejected` value, not raised:
Serve logs every exception a replica raises at ERROR with its traceback, and a bad upload is not an
incident (it gets one INFO line here). Image decoding runs in a worker thread, at most
`max_concurrent_decodes` at once per replica (a decoded image can be ~50 MB at the pixel limit).

Where each batch computes differs on purpose. The encoder's batch (a few large tensor ops that release the
GIL) runs in a worker thread, so the HTTP replica's event loop keeps answering /healthz and admitting or
shedding requests meanwhile. The decoder's batch runs on its replica's user-code event loop: handed to a
thread, the Python-heavy generation loop held the GIL against the thread that admits requests, so batches
stayed at 1-3 requests under 32 concurrent clients (1.2x from batching); run inline, requests pile up while
a batch computes and the next batch takes them all (3.4-4x, benchmarks/RESULTS.md). For the same reason
the decoder needs no wait timer (`batch_wait_timeout_s` 0): under load its batches fill from the queue that
built up during the last one. The encoder's do not: its requests reach the batch queue one at a time, each
after its HTTP handling and image decode on the busy replica, so without a wait its batches held 1-2 images
under 32 clients; serve/config.yaml gives it a few ms. Batch sizes and waits come from `user_config` and are
applied in `reconfigure()`, so `serve deploy` can change them without restarting replicas.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from ray import serve

from jobs.checkpoints import ResolvedCheckpoint, resolve_checkpoint
from model.checkpoint import load_decoder, load_encoder
from model.codec import HEADER_SIZE, PlanError, PlanFingerprintError, decode_plan, encode_plan, plan_nbytes
from model.generation import generate
from model.tokenizer import ByteTokenizer
from model.transform import ImageDecodeError, ImageTransform

log = logging.getLogger("ray.serve")
MAX_TEMPERATURE = 2.0
# The image formats the service accepts, each covered by a test over HTTP; anything else Pillow could
# open (GIF, BMP, TIFF, ICO, PSD, ...) is a 415, not an untested decoder run on untrusted bytes.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")


class ParameterError(ValueError):
    """A sampling parameter outside what the decoder accepts (HTTP 422)."""


@dataclass(frozen=True)
class Rejected:
    """A request the client must fix, returned instead of raised; the ingress maps `reason` to a status.

    reason: an ImageDecodeError reason ("not_an_image", "too_many_pixels", ...), "invalid_plan",
    "plan_fingerprint_mismatch" or "invalid_parameter".
    """

    reason: str
    detail: str


def _rejected(exc: Exception) -> Rejected:
    """The Rejected value for a client-caused exception, logged as one INFO line (no traceback)."""
    if isinstance(exc, ImageDecodeError):
        out = Rejected(exc.reason, exc.detail or str(exc))
    elif isinstance(exc, PlanFingerprintError):
        out = Rejected("plan_fingerprint_mismatch", str(exc))
    elif isinstance(exc, PlanError):
        out = Rejected("invalid_plan", str(exc))
    else:
        out = Rejected("invalid_parameter", str(exc))
    log.info("rejected request: %s: %s", out.reason, out.detail)
    return out


def _batch_settings(user_config: dict[str, Any] | None) -> tuple[int, float]:
    cfg = dict(user_config or {})
    unknown = sorted(set(cfg) - {"max_batch_size", "batch_wait_timeout_s"})
    if unknown:
        raise ValueError(f"unknown user_config key(s) {unknown}; valid: max_batch_size, batch_wait_timeout_s")
    size, wait = int(cfg.get("max_batch_size", 16)), float(cfg.get("batch_wait_timeout_s", 0.0))
    if size < 1 or wait < 0:
        raise ValueError(f"user_config needs max_batch_size >= 1 and batch_wait_timeout_s >= 0, got {cfg}")
    return size, wait


def _load(source: str, tracking_uri: str | None, torch_threads: int) -> ResolvedCheckpoint:
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    return resolve_checkpoint(source, tracking_uri=tracking_uri)  # the same rule as jobs.evaluate


class PlanEncoder:
    """Image encoder, text encoder, fusion and predictor: image bytes -> plan bytes, batched.

    Not a deployment: the Ingress replica holds one (serve/ingress.py), its `user_config` sets the batch
    size, and its autoscaling_config scales HTTP and encoding together.
    """

    def __init__(
        self,
        source: str,
        tracking_uri: str | None = None,
        torch_threads: int = 0,
        max_pixels: int = 64_000_000,
        plan_dtype: str = "fp16",
        max_concurrent_decodes: int = 2,
    ) -> None:
        self.resolved = _load(source, tracking_uri, torch_threads)
        part = load_encoder(self.resolved.path)
        self.resolved.release()
        self.encoder, self.cfg, self.fingerprint = part.module, part.config.model, part.fingerprint
        self.plan_dtype = plan_dtype
        self.transform = ImageTransform(self.cfg.image_size, max_pixels=max_pixels, formats=ACCEPTED_FORMATS)
        # Bounds decode memory per replica: each decode holds up to ~4 bytes x max_pixels at its peak.
        self._decodes = asyncio.Semaphore(max_concurrent_decodes)
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

    async def encode(self, image: bytes) -> bytes | Rejected:
        """Image bytes -> plan bytes, or Rejected for an image that cannot be decoded."""
        async with self._decodes:
            try:
                pixels = await asyncio.to_thread(self.transform, image)  # (3, S, S); decoding is per request
            except ImageDecodeError as exc:
                return _rejected(exc)
        return await self._encode_batch(pixels)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _encode_batch(self, images: list[torch.Tensor]) -> list[bytes]:
        # In a thread: the event loop meanwhile admits requests (which queue up for the next batch) and
        # answers /healthz; the forward's tensor ops release the GIL.
        return await asyncio.to_thread(self.plan_bytes, torch.stack(images))  # (B, 3, S, S)

    def plan_bytes(self, images: torch.Tensor) -> list[bytes]:
        """(B, 3, S, S) -> B plans in the codec wire format."""
        return [encode_plan(p, fingerprint=self.fingerprint, dtype=self.plan_dtype) for p in self.plans(images)]

    @torch.inference_mode()  # grad mode is per thread: set it on the thread that runs the model
    def plans(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, K, D): model.PlanEncoder.encode, which caches the fixed query's encoding."""
        return self.encoder.encode(images)


@serve.deployment(
    name="PlanDecoder",
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=32,
    max_queued_requests=64,
    user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.0},
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

    async def decode(
        self, plan_bytes: bytes, max_new_tokens: int | None = None, temperature: float = 0.0
    ) -> str | Rejected:
        """Plan bytes -> caption, or Rejected for a bad plan or parameter."""
        try:
            limit = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
            if not 1 <= limit <= self.max_new_tokens:
                raise ParameterError(f"max_new_tokens={limit} is outside [1, {self.max_new_tokens}]")
            temperature = float(temperature)
            if not (math.isfinite(temperature) and 0.0 <= temperature <= MAX_TEMPERATURE):
                raise ParameterError(f"temperature={temperature} is outside [0, {MAX_TEMPERATURE}]")
            plan = decode_plan(
                plan_bytes, expect_k=self.cfg.plan_len, expect_d=self.cfg.plan_dim, expect_fingerprint=self.fingerprint
            )  # (K, D)
        except (ParameterError, PlanError, ValueError) as exc:
            return _rejected(exc)
        result = await self._decode_batch((plan, limit, temperature))
        if isinstance(result, Exception):  # this row failed on its own (see captions); its neighbours did not
            raise result
        return result

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _decode_batch(self, requests: list[tuple[torch.Tensor, int, float]]) -> list[str | Exception]:
        return self.captions(requests)

    @torch.inference_mode()
    def captions(self, requests: list[tuple[torch.Tensor, int, float]]) -> list[str | Exception]:
        """One generate() call per distinct temperature; each row is cut to its own length limit.

        Rows of a batch never interact (each reads only its own plan and tokens), so decoding a row
        in a batch to the group's longest limit and cutting it gives what a solo call would give.
        A group that fails is decoded again one row at a time, so only the row that fails alone gets
        the exception (as its result) and every other row still gets its caption.
        """
        out: list[str | Exception] = [""] * len(requests)
        groups: dict[float, list[int]] = {}
        for i, (_, _, temperature) in enumerate(requests):
            groups.setdefault(temperature, []).append(i)
        for temperature, rows in groups.items():
            try:
                self._caption_rows(requests, rows, temperature, out)
            except Exception:
                log.exception("decoding a batch of %d failed; decoding its rows one by one", len(rows))
                for i in rows:
                    try:
                        self._caption_rows(requests, [i], temperature, out)
                    except Exception as exc:
                        out[i] = exc
        return out

    def _caption_rows(
        self, requests: list[tuple[torch.Tensor, int, float]], rows: list[int], temperature: float, out: list
    ) -> None:
        plans = torch.stack([requests[i][0] for i in rows])  # (b, K, D)
        longest = max(requests[i][1] for i in rows)
        tokens = generate(
            self.decoder, plans, max_new_tokens=longest, temperature=temperature, generator=self.generator
        )  # (b, <= longest)
        for row, i in enumerate(rows):
            out[i] = self.tokenizer.decode(tokens[row, : requests[i][1]])
