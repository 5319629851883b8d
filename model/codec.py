"""The latent-plan wire format: a (K, D) plan <-> a few hundred to a few thousand bytes.

The encoder half of the model turns an image into a plan and the decoder half turns a plan into
text; this is what travels between them (and between machines). Layout, all little-endian:

    offset  size  field
    0       4     magic b"VLJP"
    4       1     format version (1)
    5       1     payload code: low 4 bits = dtype (1 fp16, 2 int8, 3 int4, 4 int3, 5 int2),
                  high 4 bits = lossless compression of the payload (0 none, 1 zlib, 2 lzma)
    6       2     K (u16): plan rows
    8       2     D (u16): plan width (the model's `plan_dim`: embed_dim, or model.wire_dim when set)
    10      8     fingerprint: the model weights' 16-hex-char fingerprint as 8 raw bytes
    18      ...   payload (compressed as a whole when the high bits say so)
                  fp16: K*D little-endian float16 values, row-major (K*D*2 bytes; 8,192 at K=16, D=256)
                  int8: K float16 per-row scales, then K*D int8 values (K*2 + K*D bytes)
                  intN (N = 4, 3, 2): K float16 per-row scales, then the K*D N-bit codes packed
                        row-major, least significant bit first, zero-padded to a whole byte
                        (K*2 + ceil(K*D*N/8) bytes; 528 at K=8, D=128, int4)

Uncompressed fp16 and int8 plans are byte-identical to what this module wrote before the other
codes existed, so old plans still decode.

int8 is symmetric per-row ("per-vector") absmax quantisation: row k is stored as
round(x / s_k) with s_k = max|x_k| / 127, so every row keeps its own dynamic range.

intN keeps a scale per row too, but with only 2^N levels absmax wastes most of them on the row's
one or two largest values. It is a "mid-rise" quantiser: code q in [0, L) (L = 2^N) stands for
(q - (L - 1) / 2) * s_k, so no level is spent on exactly zero, and each row's s_k is the one of a
few clipping points (SCALE_GRID, fractions of the absmax) with the least squared error: values
beyond the clipping point saturate at the outermost level. The search runs at encode time only.

Decoding checks, in this order, and raises a specific `PlanError` subclass naming expected vs got:
    shorter than the header            PlanLengthError
    wrong magic                        PlanFormatError
    unknown version                    PlanVersionError
    unknown dtype or compression code  PlanDtypeError
    K or D of zero in the header       PlanShapeError
    compressed stream corrupt/short    PlanCompressionError
    payload length != header's K, D    PlanLengthError      (after decompression)
    K or D != what the caller expects  PlanShapeError
    fingerprint != the caller's model  PlanFingerprintError   (HTTP 409; all others are 422)
    NaN or infinity in the payload     PlanValueError
"""

from __future__ import annotations

import lzma
import struct
import zlib
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

MAGIC = b"VLJP"
VERSION = 1
DTYPE_CODES: dict[str, int] = {"fp16": 1, "int8": 2, "int4": 3, "int3": 4, "int2": 5}
DTYPE_NAMES: dict[int, str] = {code: name for name, code in DTYPE_CODES.items()}
PACKED_BITS: dict[str, int] = {"int4": 4, "int3": 3, "int2": 2}  # bit-packed codes below a byte
COMPRESSION_CODES: dict[str, int] = {"none": 0, "zlib": 1, "lzma": 2}
COMPRESSION_NAMES: dict[int, str] = {code: name for name, code in COMPRESSION_CODES.items()}
_HEADER = struct.Struct("<4sBBHH8s")
HEADER_SIZE = _HEADER.size  # 18
_FP16_MAX = float(np.finfo(np.float16).max)  # 65504
_U16_MAX = 0xFFFF
# Clipping points tried per row for intN, as fractions of the row's absmax (1.0 = no clipping).
SCALE_GRID = np.linspace(0.3, 1.0, 15, dtype=np.float32)

PlanDtype = Literal["fp16", "int8", "int4", "int3", "int2"]
Compression = Literal["none", "zlib", "lzma"]


class PlanError(ValueError):
    """Base class: bytes that are not a plan this decoder can use."""


class PlanFormatError(PlanError):
    """Not a plan at all (wrong magic)."""


class PlanLengthError(PlanError):
    """Too short for the header, or payload length disagrees with the header's K, D and dtype."""


class PlanVersionError(PlanError):
    """A wire-format version this code does not read."""


class PlanDtypeError(PlanError):
    """An unknown payload dtype or compression code (or an unknown name when encoding)."""


class PlanCompressionError(PlanError):
    """A compressed payload that does not decompress: corrupt, truncated, or with bytes after its end."""


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
    compression: str = "none"


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPE_CODES:
        raise PlanDtypeError(f"unknown plan dtype {dtype!r}; expected one of {', '.join(DTYPE_CODES)}")


def _check_compression(compression: str) -> None:
    if compression not in COMPRESSION_CODES:
        raise PlanDtypeError(
            f"unknown plan compression {compression!r}; expected one of {', '.join(COMPRESSION_CODES)}"
        )


def plan_nbytes(k: int, d: int, dtype: PlanDtype = "fp16") -> int:
    """Payload size in bytes before any compression (header excluded)."""
    _check_dtype(dtype)
    if dtype == "fp16":
        return k * d * 2
    if dtype == "int8":
        return k * 2 + k * d
    return k * 2 + (k * d * PACKED_BITS[dtype] + 7) // 8


def parse_format(name: str) -> tuple[PlanDtype, Compression]:
    """ "int4+zlib" -> ("int4", "zlib"); "fp16" -> ("fp16", "none"). The names the server and benchmarks use."""
    dtype, _, compression = name.partition("+")
    compression = compression or "none"
    _check_dtype(dtype)
    _check_compression(compression)
    return dtype, compression  # type: ignore[return-value]


def _fingerprint_bytes(fingerprint: str) -> bytes:
    try:
        raw = bytes.fromhex(fingerprint)
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != 8:
        raise PlanError(f"fingerprint must be 16 hex characters, got {fingerprint!r}")
    return raw


def encode_plan(
    plan: Tensor, *, fingerprint: str, dtype: PlanDtype = "fp16", compression: Compression = "none"
) -> bytes:
    """(K, D) plan (or (1, K, D)) -> header + payload bytes."""
    _check_dtype(dtype)
    _check_compression(compression)
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
    code = DTYPE_CODES[dtype] | COMPRESSION_CODES[compression] << 4
    header = _HEADER.pack(MAGIC, VERSION, code, k, d, _fingerprint_bytes(fingerprint))
    if dtype == "fp16":
        if np.abs(arr).max() > _FP16_MAX:
            raise PlanValueError(f"plan values up to {np.abs(arr).max():.3g} overflow fp16 (max {_FP16_MAX})")
        payload = arr.astype("<f2").tobytes()
    elif dtype == "int8":
        scales, values = _quantize_int8(arr)
        payload = scales.tobytes() + values.tobytes()
    else:
        bits = PACKED_BITS[dtype]
        scales, codes = _quantize_midrise(arr, bits)
        payload = scales.tobytes() + _pack_bits(codes, bits)
    return header + _compress(payload, compression)


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


def _midrise_codes(arr: np.ndarray, s: np.ndarray, levels: int) -> np.ndarray:
    """Codes in [0, levels) for values (..., K, D) at per-row steps s (..., K, 1); a zero step gives the middle."""
    half = (levels - 1) / 2.0
    safe = np.where(s > 0, s, 1.0)
    return np.floor(arr / safe + half + 0.5).clip(0, levels - 1)


def _quantize_midrise(arr: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, D) float32 -> per-row steps (K,) <f2 and codes (K, D) uint8 in [0, 2^bits), least squared error."""
    levels = 1 << bits
    half = (levels - 1) / 2.0
    absmax = np.abs(arr).max(axis=1)  # (K,)
    if absmax.max() / half > _FP16_MAX:
        raise PlanValueError(f"plan values up to {absmax.max():.3g} overflow the {bits}-bit format's fp16 scale")
    # Candidate steps, rounded to fp16 as they will be stored: (G, K, 1).
    steps = (SCALE_GRID[:, None] * absmax[None, :] / half).astype("<f2").astype(np.float32)[:, :, None]
    codes = _midrise_codes(arr[None], steps, levels)  # (G, K, D)
    error = (((codes - half) * steps - arr[None]) ** 2).sum(axis=2)  # (G, K)
    best = error.argmin(axis=0)  # (K,): ties go to the first (strongest clipping) candidate
    rows = np.arange(arr.shape[0])
    scales = steps[best, rows, 0].astype("<f2")  # (K,)
    return scales, codes[best, rows].astype(np.uint8)  # (K,), (K, D)


def _pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """(K, D) codes < 2^bits -> ceil(K*D*bits/8) bytes, row-major, least significant bit first."""
    flat = codes.reshape(-1, 1)  # (K*D, 1)
    planes = (flat >> np.arange(bits, dtype=np.uint8)) & 1  # (K*D, bits): bit j of each code
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def _unpack_bits(data: memoryview, count: int, bits: int) -> np.ndarray:
    """The inverse of _pack_bits: (count,) uint8 codes."""
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little", count=count * bits)
    weights = (1 << np.arange(bits, dtype=np.uint8)).astype(np.uint8)  # (bits,)
    return (planes.reshape(count, bits) * weights).sum(axis=1, dtype=np.uint8)


def _compress(payload: bytes, compression: str) -> bytes:
    if compression == "zlib":
        return zlib.compress(payload, 9)
    if compression == "lzma":
        # Raw LZMA2 stream: the .xz container's headers and check would cost ~60 bytes per plan.
        return lzma.compress(payload, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    return payload


_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9}]


def _decompress(data: memoryview, compression: str, want: int, head: PlanHeader) -> bytes:
    """Decompress at most want + 1 bytes (a zip bomb costs nothing); the stream must end exactly at the data's end."""
    what = f"{compression}-compressed {head.dtype} payload (K={head.k}, D={head.d})"
    try:
        if compression == "zlib":
            dec = zlib.decompressobj()
            out = dec.decompress(data, want + 1)
            done, leftover = dec.eof, dec.unused_data
        else:
            dec = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
            out = dec.decompress(data, max_length=want + 1)
            done, leftover = dec.eof, dec.unused_data
    except (zlib.error, lzma.LZMAError) as exc:
        raise PlanCompressionError(f"{what} is corrupt: {exc}") from None
    if len(out) > want:
        raise PlanLengthError(
            f"plan length mismatch: header says {head.dtype} K={head.k} D={head.d}, "
            f"so expected {want} bytes after {compression} decompression, got more"
        )
    if not done:
        raise PlanCompressionError(f"{what} is truncated: the compressed stream ends early ({len(data)} bytes)")
    if leftover:
        raise PlanCompressionError(f"{what} has {len(leftover)} unexpected byte(s) after the compressed stream")
    return out


def parse_header(data: bytes | bytearray | memoryview) -> PlanHeader:
    """Validate and read the header alone (magic, version, dtype and compression codes, non-zero K and D)."""
    data = bytes(data)
    if len(data) < HEADER_SIZE:
        raise PlanLengthError(f"plan is {len(data)} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, code, k, d, fp = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise PlanFormatError(f"bad magic: expected {MAGIC!r}, got {magic!r}")
    if version != VERSION:
        raise PlanVersionError(f"unsupported plan format version: expected {VERSION}, got {version}")
    if code & 0x0F not in DTYPE_NAMES:
        known = ", ".join(f"{c} ({n})" for c, n in DTYPE_NAMES.items())
        raise PlanDtypeError(f"unknown plan dtype code: expected one of {known}, got {code & 0x0F} (byte 5 = {code})")
    if code >> 4 not in COMPRESSION_NAMES:
        known = ", ".join(f"{c} ({n})" for c, n in COMPRESSION_NAMES.items())
        raise PlanDtypeError(
            f"unknown plan compression code: expected one of {known}, got {code >> 4} (byte 5 = {code})"
        )
    if k == 0 or d == 0:
        raise PlanShapeError(f"plan header declares an empty shape: expected K, D >= 1, got K={k}, D={d}")
    return PlanHeader(
        version=version,
        dtype=DTYPE_NAMES[code & 0x0F],
        k=k,
        d=d,
        fingerprint=fp.hex(),
        compression=COMPRESSION_NAMES[code >> 4],
    )


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
    size = plan_nbytes(head.k, head.d, head.dtype)  # type: ignore[arg-type]
    payload = memoryview(data)[HEADER_SIZE:]
    if head.compression != "none":
        payload = memoryview(_decompress(payload, head.compression, size, head))
    if len(payload) != size:
        packed = "" if head.compression == "none" else f" after {head.compression} decompression"
        raise PlanLengthError(
            f"plan length mismatch: header says {head.dtype} K={head.k} D={head.d}, "
            f"so expected {HEADER_SIZE + size} bytes, got {HEADER_SIZE + len(payload)}{packed}"
        )
    if expect_k is not None and head.k != expect_k:
        raise PlanShapeError(f"plan K mismatch: expected K={expect_k}, got K={head.k}")
    if expect_d is not None and head.d != expect_d:
        raise PlanShapeError(f"plan D mismatch: expected D={expect_d}, got D={head.d}")
    if expect_fingerprint is not None and head.fingerprint != expect_fingerprint.lower():
        raise PlanFingerprintError(
            f"plan fingerprint mismatch: expected {expect_fingerprint.lower()} (this model), got {head.fingerprint}"
        )
    if head.dtype == "fp16":
        arr = np.frombuffer(payload, dtype="<f2").astype(np.float32).reshape(head.k, head.d)
    else:
        scales = np.frombuffer(payload[: head.k * 2], dtype="<f2").astype(np.float32)[:, None]  # (K, 1)
        if head.dtype == "int8":
            values = np.frombuffer(payload[head.k * 2 :], dtype=np.int8).astype(np.float32)
        else:
            bits = PACKED_BITS[head.dtype]
            codes = _unpack_bits(payload[head.k * 2 :], head.k * head.d, bits)
            values = codes.astype(np.float32) - ((1 << bits) - 1) / 2.0
        arr = values.reshape(head.k, head.d) * scales  # (K, D)
    if not np.isfinite(arr).all():
        raise PlanValueError("plan payload contains NaN or infinite values: expected finite values only")
    return torch.from_numpy(arr)  # (K, D) float32, owns its memory (astype copied)
