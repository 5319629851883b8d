"""The one image transform that training and serving share.

    bytes -> open (lazy header) -> pixel-count guard -> [JPEG draft] -> load -> EXIF transpose
          -> RGB -> shorter side to `size` (bicubic, antialiased) + centre crop -> ImageNet mean/std

Every failure is an `ImageDecodeError` whose `.reason` is a short machine-friendly string:

    "empty"            no bytes at all
    "not_an_image"     Pillow cannot identify the format
    "too_many_pixels"  declared width*height above `max_pixels` (checked before any pixel is decoded)
    "truncated"        the header parsed but the pixel data ends early
    "corrupt"          the header parsed but the pixel data does not decode for another reason
    "unsupported_mode" a pixel format with no sensible RGB mapping (e.g. 32-bit float)
    "unsupported_format" a format Pillow reads but the caller did not allow (`formats=`)

Mode handling (-> RGB):
    L, 1, P (opaque), CMYK, YCbCr, LAB, HSV, RGBX   Pillow's own conversion
    RGBA, LA, PA, P with transparency, RGBa, La     alpha-composited on white, so a transparent
                                                    background is white (not black) as most viewers show it
    I;16 (all byte orders), I                       16-bit range scaled to 8 bits (v * 255 / 65535);
                                                    Pillow's own convert would clip everything above 255 to white
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    from torch import Tensor
# torch only in to_tensor: Ray processes that import jobs.batches just to unpickle the pipeline never need it
# (see model/tokenizer.py).

MAX_PIXELS = 64_000_000  # default decompression-bomb guard: 64 megapixels
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_PILLOW_CONVERTIBLE = {"RGB", "L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"}


class ImageDecodeError(ValueError):
    """An image that cannot become a model input; `.reason` says why in one word."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def open_image(
    data: bytes, *, max_pixels: int = MAX_PIXELS, draft_size: int | None = None, formats: tuple[str, ...] | None = None
) -> Image.Image:
    """Decode image bytes to a fully loaded, upright RGB image, or raise `ImageDecodeError`.

    `draft_size`: for JPEG, let libjpeg decode at 1/2, 1/4 or 1/8 scale as long as both sides stay
    >= draft_size, which is much faster for large photos and changes the result only slightly.
    `formats`: Pillow format names to accept (e.g. ("PNG", "JPEG")); None accepts every format Pillow reads.
    """
    if not data:
        raise ImageDecodeError("empty", "no image bytes")
    # Pillow's own bomb check runs inside Image.open; turn its warning into an error so it never
    # decodes an over-limit image either. Its limit (Image.MAX_IMAGE_PIXELS) applies on top of ours.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))  # lazy: reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError("too_many_pixels", str(exc)) from None
        except UnidentifiedImageError:
            raise ImageDecodeError("not_an_image", f"unrecognised format ({len(data)} bytes)") from None
        except Exception as exc:  # a plugin that chokes on its own header
            raise ImageDecodeError("not_an_image", f"{type(exc).__name__}: {exc}") from None

        if formats is not None and img.format not in formats:
            raise ImageDecodeError("unsupported_format", f"{img.format} images are not accepted; send {formats}")
        width, height = img.size
        if width * height > max_pixels:
            raise ImageDecodeError("too_many_pixels", f"{width}x{height} = {width * height} pixels > {max_pixels}")
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        _load(img)
    return to_rgb(img)


def _load(img: Image.Image) -> None:
    """Force the decode (Image.open is lazy) so a broken file fails here, not later."""
    # Pillow would silently pad a truncated file with grey if this global were on; we want the error.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; truncated images would pass as valid")
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("too_many_pixels", str(exc)) from None
    except EOFError as exc:
        raise ImageDecodeError("truncated", f"EOFError: {exc}") from None
    except Exception as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise ImageDecodeError(reason, f"{type(exc).__name__}: {exc}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation, then map any supported mode to 8-bit RGB (see module docstring)."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF: keep the stored orientation rather than reject the picture
        img.load()
    mode = img.mode
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA") if mode != "RGBA" else img
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray(sixteen_to_eight(np.asarray(img)), mode="L").convert("RGB")
    if mode in _PILLOW_CONVERTIBLE:
        return img if mode == "RGB" else img.convert("RGB")
    raise ImageDecodeError("unsupported_mode", f"pixel mode {mode!r} has no RGB mapping")


def sixteen_to_eight(values: np.ndarray, rows_per_block: int = 256) -> np.ndarray:
    """(H, W) uint16 or int32 -> (H, W) uint8, v * 255 / 65535 rounded to nearest (values clipped to 0..65535).

    Works through blocks of rows in uint32 (65535 * 255 + 32767 fits), so the temporaries stay at
    ~4 bytes x W x rows_per_block instead of whole-image int64 arrays (8 bytes a pixel, several of them).
    """
    out = np.empty(values.shape, dtype=np.uint8)  # (H, W)
    for top in range(0, values.shape[0], rows_per_block):
        block = values[top : top + rows_per_block]
        if block.dtype != np.uint16:
            block = block.clip(0, 65535)
        wide = block.astype(np.uint32)
        wide *= 255
        wide += 32767
        wide //= 65535
        out[top : top + rows_per_block] = wide
    return out


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side -> `size`, then the centred `size` x `size` square (one bicubic resample).

    Resampling the centred square box straight to (size, size) is the same geometry as
    "resize, then crop", without rounding the intermediate size. Pillow's bicubic filter widens
    its support when shrinking, so downscaling is antialiased.
    """
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    if (width, height) == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))


def normalize_uint8(arr: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32, scaled to [0, 1] then ImageNet-normalised."""
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected a (B, H, W, 3) uint8 array, got {arr.shape} {arr.dtype}")
    scale = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)  # (3,)
    shift = (IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)  # (3,)
    # Transpose the uint8 input (1 byte an element) rather than the float result, then scale in place: the
    # same float32 operations element by element (bit-identical), ~4x faster than transposing floats.
    out = np.ascontiguousarray(arr.transpose(0, 3, 1, 2)).astype(np.float32)  # (B, 3, H, W)
    out *= scale[:, None, None]
    out -= shift[:, None, None]
    return out


def to_tensor(img: Image.Image) -> Tensor:
    """An RGB image -> (3, H, W) float32, ImageNet-normalised."""
    if img.mode != "RGB":
        raise ValueError(f"to_tensor expects an RGB image, got mode {img.mode!r}")
    import torch

    arr = np.asarray(img, dtype=np.uint8)[None]  # (1, H, W, 3)
    return torch.from_numpy(normalize_uint8(arr)[0])  # (3, H, W)


class ImageTransform:
    """bytes or a PIL image -> (3, S, S) model input. The only path images take, in training and serving."""

    def __init__(
        self,
        image_size: int,
        *,
        max_pixels: int = MAX_PIXELS,
        use_draft: bool = True,
        formats: tuple[str, ...] | None = None,
    ) -> None:
        self.image_size = image_size
        self.max_pixels = max_pixels
        self.use_draft = use_draft
        self.formats = formats  # None: any format Pillow reads

    def load(self, data: bytes | Image.Image) -> Image.Image:
        """The (S, S) RGB image the model will see (useful for previews and for storing resized data)."""
        if isinstance(data, Image.Image):
            img = to_rgb(data)
        else:
            draft = self.image_size if self.use_draft else None
            img = open_image(data, max_pixels=self.max_pixels, draft_size=draft, formats=self.formats)
        return resize_center_crop(img, self.image_size)

    def __call__(self, data: bytes | Image.Image) -> Tensor:
        return to_tensor(self.load(data))  # (3, S, S)

    def __repr__(self) -> str:
        return f"ImageTransform(image_size={self.image_size}, max_pixels={self.max_pixels})"
