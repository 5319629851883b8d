"""The latent-plan wire format: a (K, D) plan <-> a few kilobytes of bytes.

The encoder half of the model turns an image into a plan and the decoder half turns a plan into
text; this is what travels between them (and between machines). Layout, all little-endian:

    offset  size  field
    0       4     magic b"VLJP"
    4       1     format version (1)
    5       1     dtype code: 1 = fp16, 2 = int8
    6       2     K (u16): plan rows
    8       2     D (u16): plan width
    10      8     fingerprint: the model weights' 16-hex-char fingerprint as 8 raw bytes
    18      ...   payload
                  fp16: K*D little-endian float16 values, row-major (K*D*2 bytes; 8,192 at K=16, D=256)
                  int8: K float16 per-row scales, then K*D int8 values (K*2 + K*D bytes)

int8 is symmetric per-row ("per-vector") absmax quantisation: row k is stored as
round(x / s_k) with s_k = max|x_k| / 127, so every row keeps its own dynamic range.

Decoding checks, in this order, and raises a specific `PlanError` subclass naming expected vs got:
    shorter than the header            PlanLengthError
    wrong magic                        PlanFormatError
    unknown version                    PlanVersionError
    unknown dtype code                 PlanDtypeError
    K or D of zero in the header       PlanShapeError
    payload length != header's K, D    PlanLengthError
    K or D != what the caller expects  PlanShapeError
    fingerprint != the caller's model  PlanFingerprintError   (HTTP 409; all others are 422)
    NaN or infinity in the payload     PlanValueError
"""

from __future__ import annotations

import struct
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

MAGIC = b"VLJP"
VERSION = 1
DTYPE_CODES: dict[str, int] = {"fp16": 1, "int8": 2}
DTYPE_NAMES: dict[int, str] = {code: name for name, code in DTYPE_CODES.items()}
_HEADER = struct.Struct("<4sBBHH8s")
HEADER_SIZE = _HEADER.size  # 18
_FP16_MAX = float(np.finfo(np.float16).max)  # 65504
_U16_MAX = 0xFFFF

PlanDtype = Literal["fp16", "int8"]


class PlanError(ValueError):
    """Base class: bytes that are not a plan this decoder can use."""


class PlanFormatError(PlanError):
    """Not a plan at all (wrong magic)."""


class PlanLengthError(PlanError):
    """Too short for the header, or payload length disagrees with the header's K, D and dtype."""


class PlanVersionError(PlanError):
    """A wire-format version this code does not read."""


class PlanDtypeError(PlanError):
    """An unknown payload dtype code (or an unknown dtype name when encoding)."""


class PlanShapeError(PlanError):
    """K or D is zero, or differs from what the decoder model expects."""


class PlanFingerprintError(PlanError):
    """The plan was made by different model weights than the decoder's."""


class PlanValueError(PlanError):
    """NaN/infinite values, or values outside what the payload dtype can hold."""


class PlanHeader(NamedTuple):
    version: int
    dtype: str
    k: int
    d: int
    fingerprint: str  # 16 lowercase hex chars


def plan_nbytes(k: int, d: int, dtype: PlanDtype = "fp16") -> int:
    """Payload size in bytes (header excluded)."""
    if dtype == "fp16":
        return k * d * 2
    if dtype == "int8":
        return k * 2 + k * d
    raise PlanDtypeError(f"unknown plan dtype {dtype!r}; expected one of {', '.join(DTYPE_CODES)}")


def _fingerprint_bytes(fingerprint: str) -> bytes:
    try:
        raw = bytes.fromhex(fingerprint)
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != 8:
        raise PlanError(f"fingerprint must be 16 hex characters, got {fingerprint!r}")
    return raw


def encode_plan(plan: Tensor, *, fingerprint: str, dtype: PlanDtype = "fp16") -> bytes:
    """(K, D) plan (or (1, K, D)) -> header + payload bytes."""
    if dtype not in DTYPE_CODES:
        raise PlanDtypeError(f"unknown plan dtype {dtype!r}; expected one of {', '.join(DTYPE_CODES)}")
    x = torch.as_tensor(plan).detach()
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]  # (1, K, D) -> (K, D): a batch of one
    if x.dim() != 2:
        raise PlanShapeError(f"expected a plan of shape (K, D) or (1, K, D), got {tuple(plan.shape)}")
    k, d = x.shape
    if not (0 < k <= _U16_MAX and 0 < d <= _U16_MAX):
        raise PlanShapeError(f"plan shape (K={k}, D={d}) must have 1 <= K, D <= {_U16_MAX}")
    arr = x.to(torch.float32).cpu().numpy()  # (K, D)
    if not np.isfinite(arr).all():
        raise PlanValueError("plan contains NaN or infinite values: expected finite values only")
    header = _HEADER.pack(MAGIC, VERSION, DTYPE_CODES[dtype], k, d, _fingerprint_bytes(fingerprint))
    if dtype == "fp16":
        if np.abs(arr).max() > _FP16_MAX:
            raise PlanValueError(f"plan values up to {np.abs(arr).max():.3g} overflow fp16 (max {_FP16_MAX})")
        return header + arr.astype("<f2").tobytes()
    scales, values = _quantize_int8(arr)
    return header + scales.tobytes() + values.tobytes()


def _quantize_int8(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, D) float32 -> per-row scales (K,) <f2 and values (K, D) int8, symmetric absmax."""
    absmax = np.abs(arr).max(axis=1)  # (K,)
    if absmax.max() / 127.0 > _FP16_MAX:
        raise PlanValueError(f"plan values up to {absmax.max():.3g} overflow the int8 format's fp16 scale")
    # Round the scale to fp16 first and quantise with that exact value, so decode sees what encode used.
    scales = (absmax / 127.0).astype("<f2")  # (K,)
    s = scales.astype(np.float32)[:, None]  # (K, 1)
    safe = np.where(s > 0, s, 1.0)  # an all-zero row (or one that underflows fp16) stores zeros
    values = np.where(s > 0, np.rint(arr / safe), 0.0).clip(-127, 127).astype(np.int8)  # (K, D)
    return scales, values


def parse_header(data: bytes | bytearray | memoryview) -> PlanHeader:
    """Validate and read the header alone (magic, version, dtype, non-zero K and D)."""
    data = bytes(data)
    if len(data) < HEADER_SIZE:
        raise PlanLengthError(f"plan is {len(data)} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, code, k, d, fp = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise PlanFormatError(f"bad magic: expected {MAGIC!r}, got {magic!r}")
    if version != VERSION:
        raise PlanVersionError(f"unsupported plan format version: expected {VERSION}, got {version}")
    if code not in DTYPE_NAMES:
        known = ", ".join(f"{c} ({n})" for c, n in DTYPE_NAMES.items())
        raise PlanDtypeError(f"unknown plan dtype code: expected one of {known}, got {code}")
    if k == 0 or d == 0:
        raise PlanShapeError(f"plan header declares an empty shape: expected K, D >= 1, got K={k}, D={d}")
    return PlanHeader(version=version, dtype=DTYPE_NAMES[code], k=k, d=d, fingerprint=fp.hex())


def decode_plan(
    data: bytes | bytearray | memoryview,
    *,
    expect_k: int | None = None,
    expect_d: int | None = None,
    expect_fingerprint: str | None = None,
) -> Tensor:
    """Plan bytes -> (K, D) float32 tensor, after every check in the module docstring."""
    data = bytes(data)
    head = parse_header(data)
    want = HEADER_SIZE + plan_nbytes(head.k, head.d, head.dtype)  # type: ignore[arg-type]
    if len(data) != want:
        raise PlanLengthError(
            f"plan length mismatch: header says {head.dtype} K={head.k} D={head.d}, "
            f"so expected {want} bytes, got {len(data)}"
        )
    if expect_k is not None and head.k != expect_k:
        raise PlanShapeError(f"plan K mismatch: expected K={expect_k}, got K={head.k}")
    if expect_d is not None and head.d != expect_d:
        raise PlanShapeError(f"plan D mismatch: expected D={expect_d}, got D={head.d}")
    if expect_fingerprint is not None and head.fingerprint != expect_fingerprint.lower():
        raise PlanFingerprintError(
            f"plan fingerprint mismatch: expected {expect_fingerprint.lower()} (this model), got {head.fingerprint}"
        )
    payload = memoryview(data)[HEADER_SIZE:]
    if head.dtype == "fp16":
        arr = np.frombuffer(payload, dtype="<f2").astype(np.float32).reshape(head.k, head.d)
    else:
        scales = np.frombuffer(payload[: head.k * 2], dtype="<f2").astype(np.float32)  # (K,)
        values = np.frombuffer(payload[head.k * 2 :], dtype=np.int8).reshape(head.k, head.d)  # (K, D)
        arr = values.astype(np.float32) * scales[:, None]
    if not np.isfinite(arr).all():
        raise PlanValueError("plan payload contains NaN or infinite values: expected finite values only")
    return torch.from_numpy(arr)  # (K, D) float32, owns its memory (astype copied)
