"""The shared image transform on every pixel mode, orientation, and broken input it must handle.

Images are built on the fly with Pillow; colours are checked after de-normalising the output.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from model.transform import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_PIXELS,
    ImageDecodeError,
    ImageTransform,
    normalize_uint8,
    open_image,
    resize_center_crop,
    to_tensor,
)

S = 16
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def to_bytes(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def pixels(t: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) float 0..255, for colour checks."""
    arr = t.numpy().transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    return arr * 255.0


def assert_colour(t: torch.Tensor, rgb: tuple[int, int, int], tol: float = 2.0) -> None:
    assert t.shape == (3, S, S) and t.dtype == torch.float32
    got = pixels(t).reshape(-1, 3)
    assert np.abs(got - np.array(rgb)).max() <= tol, f"expected {rgb}, got mean {got.mean(axis=0)}"


def two_halves(w: int, h: int, left=RED, right=BLUE) -> Image.Image:
    img = Image.new("RGB", (w, h), left)
    img.paste(right, (w // 2, 0, w, h))
    return img


# --- every pixel mode -> RGB -------------------------------------------------


def test_rgb_png_and_jpeg():
    tf = ImageTransform(S)
    assert_colour(tf(to_bytes(Image.new("RGB", (40, 30), RED))), RED)
    assert_colour(tf(to_bytes(Image.new("RGB", (40, 30), RED), "JPEG", quality=95)), RED, tol=4)


def test_grayscale_l():
    out = ImageTransform(S)(to_bytes(Image.new("L", (20, 20), 128)))
    assert_colour(out, (128, 128, 128), tol=0.01)


def test_one_bit():
    img = Image.new("1", (32, 32), 1)
    out = ImageTransform(S)(to_bytes(img))
    assert_colour(out, WHITE, tol=0.01)


def test_palette_opaque():
    img = Image.new("RGB", (20, 20), BLUE).convert("P")
    data = to_bytes(img)
    assert Image.open(io.BytesIO(data)).mode == "P"
    assert_colour(ImageTransform(S)(data), BLUE, tol=0.01)


def test_palette_with_transparency_composites_on_white():
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 0] + [255, 0, 0] * 255)  # index 0 black, the rest red
    img.paste(1, (10, 0, 20, 20))  # right half red
    data = to_bytes(img, transparency=0)  # index 0 (black) is transparent
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 0
    rgb = open_image(data)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((2, 10)) == WHITE  # transparent black became white, not black
    assert rgb.getpixel((15, 10)) == RED


def test_palette_alpha_pa():
    img = Image.new("RGBA", (20, 20), (0, 0, 255, 0)).convert("PA")  # fully transparent blue
    assert img.mode == "PA"
    assert_colour(ImageTransform(S)(img), WHITE, tol=0.01)


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [(255, RED), (0, WHITE), (128, (255, 127, 127))],
)
def test_rgba_alpha_composited_on_white(alpha, expected):
    data = to_bytes(Image.new("RGBA", (20, 20), (*RED, alpha)))
    assert_colour(ImageTransform(S)(data), expected, tol=1.01)


def test_la_gray_with_alpha():
    data = to_bytes(Image.new("LA", (20, 20), (0, 0)))  # transparent black
    assert Image.open(io.BytesIO(data)).mode == "LA"
    assert_colour(ImageTransform(S)(data), WHITE, tol=0.01)
    opaque = to_bytes(Image.new("LA", (20, 20), (60, 255)))
    assert_colour(ImageTransform(S)(opaque), (60, 60, 60), tol=0.01)


def test_cmyk_jpeg():
    data = to_bytes(Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "JPEG", quality=95)  # red in CMYK
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert_colour(ImageTransform(S)(data), RED, tol=4)


def test_sixteen_bit_png_is_scaled_not_clipped():
    # 16-bit mid-grey: Pillow's plain convert("L") would clip 32896 to 255 (white).
    img = Image.new("I;16", (20, 20), 128 * 257)
    data = to_bytes(img)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    assert_colour(ImageTransform(S)(data), (128, 128, 128), tol=0.01)
    dark = to_bytes(Image.new("I;16", (20, 20), 1000))  # 1000 / 65535 * 255 = 3.9
    assert_colour(ImageTransform(S)(dark), (4, 4, 4), tol=0.01)
    full = to_bytes(Image.new("I;16", (20, 20), 65535))
    assert_colour(ImageTransform(S)(full), WHITE, tol=0.01)


def test_32bit_int_mode_uses_16bit_range():
    img = Image.new("I", (20, 20), 65535 // 2)
    assert_colour(ImageTransform(S)(img), (127, 127, 127), tol=1.01)


def test_float_mode_is_unsupported():
    with pytest.raises(ImageDecodeError) as err:
        ImageTransform(S)(Image.new("F", (20, 20), 0.5))
    assert err.value.reason == "unsupported_mode"
    assert "'F'" in str(err.value)


# --- orientation and geometry -------------------------------------------------


def test_exif_orientation_6_rotates_upright():
    # Stored landscape 40x20: red left, blue right. Orientation 6 = display rotated 90 degrees clockwise,
    # so the upright picture is portrait 20x40 with red on top and blue at the bottom.
    stored = two_halves(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = to_bytes(stored, "JPEG", quality=95, exif=exif.tobytes())
    upright = open_image(data)
    assert upright.size == (20, 40)
    top, bottom = np.asarray(upright)[5, 10], np.asarray(upright)[35, 10]
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    # The model input differs accordingly: rows (not columns) change colour.
    out = pixels(ImageTransform(S)(data))
    assert out[1, S // 2, 0] > 200 and out[-2, S // 2, 2] > 200
    plain = pixels(ImageTransform(S)(to_bytes(stored, "JPEG", quality=95)))
    assert plain[S // 2, 1, 0] > 200 and plain[S // 2, -2, 2] > 200


def test_resize_center_crop_takes_the_middle():
    img = Image.new("RGB", (90, 30), RED)
    img.paste(BLUE, (20, 0, 70, 30))  # red | blue | red: the centre 30x30 square (and a margin) is blue
    out = resize_center_crop(img, 10)
    assert out.size == (10, 10)
    assert (np.asarray(out) == np.array(BLUE, dtype=np.uint8)).all()
    tall = resize_center_crop(Image.new("RGB", (7, 300), RED), 10)
    assert tall.size == (10, 10)  # upscaling the short side works too


def test_to_tensor_and_normalize_uint8_agree():
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, size=(3, S, S, 3), dtype=np.uint8)
    out = normalize_uint8(batch)
    assert out.shape == (3, 3, S, S) and out.dtype == np.float32
    for i in range(3):
        one = to_tensor(Image.fromarray(batch[i]))
        assert torch.allclose(one, torch.from_numpy(out[i]), atol=1e-6)
    # ImageNet normalisation: channel c of value v is (v / 255 - mean_c) / std_c
    expected = (batch[0, 0, 0, 1] / 255.0 - 0.456) / 0.224
    assert out[0, 1, 0, 0] == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        normalize_uint8(batch.astype(np.float32))


def test_draft_mode_same_output_size_and_close_values():
    rng = np.random.default_rng(1)
    # A smooth 800x600 photo-like JPEG: the draft decode (1/8 scale) must stay close to a full decode.
    yy, xx = np.mgrid[0:600, 0:800]
    arr = np.stack([xx * 255 // 800, yy * 255 // 600, (xx + yy) * 255 // 1400], axis=-1).astype(np.uint8)
    arr = np.clip(arr.astype(int) + rng.integers(-3, 4, arr.shape), 0, 255).astype(np.uint8)
    data = to_bytes(Image.fromarray(arr), "JPEG", quality=90)
    drafted = open_image(data, draft_size=64)
    assert drafted.size == (100, 75)  # decoded at 1/8 scale, short side still >= 64
    assert open_image(data).size == (800, 600)
    fast = ImageTransform(64, use_draft=True)(data)
    full = ImageTransform(64, use_draft=False)(data)
    assert fast.shape == full.shape == (3, 64, 64)
    assert (pixels(fast) - pixels(full)).__abs__().mean() < 3.0  # mean abs difference in 0..255 units


# --- broken input ---------------------------------------------------------------


def reason_of(data: bytes, **kwargs) -> str:
    with pytest.raises(ImageDecodeError) as err:
        open_image(data, **kwargs)
    assert isinstance(err.value, ValueError)
    return err.value.reason


def test_empty_bytes():
    assert reason_of(b"") == "empty"


def test_not_an_image():
    assert reason_of(b"this is plain text, not a picture" * 4) == "not_an_image"
    assert reason_of(b"\x89PNG\r\n\x1a\n") == "not_an_image"  # the signature alone


def test_truncated_jpeg_and_png():
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
    jpeg, png = to_bytes(img, "JPEG"), to_bytes(img, "PNG")
    assert reason_of(jpeg[: len(jpeg) // 2]) == "truncated"
    assert reason_of(png[: len(png) // 2]) == "truncated"
    # the transform never silently pads a truncated file (Pillow's LOAD_TRUNCATED_IMAGES stays off)
    with pytest.raises(ImageDecodeError):
        ImageTransform(S)(jpeg[: len(jpeg) // 2])


def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring width x height RGB pixels, followed by a tiny (wrong) IDAT: a decompression bomb shape."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_rejected_before_decoding():
    # 9000 x 9000 = 81 MP: above our 64 MP default, below Pillow's own limit, so our check is what stops it.
    data = png_header_only(9000, 9000)
    assert MAX_PIXELS < 9000 * 9000
    before = Image.core.get_stats()["new_count"]  # Pillow's count of image buffers allocated
    assert reason_of(data) == "too_many_pixels"  # not "truncated": the tiny IDAT was never decoded
    assert Image.core.get_stats()["new_count"] == before
    # Far beyond Pillow's limit: its own DecompressionBombError becomes the same reason.
    assert reason_of(png_header_only(100_000, 100_000)) == "too_many_pixels"
    # The limit is configurable per call.
    small = to_bytes(Image.new("RGB", (100, 100), RED))
    assert reason_of(small, max_pixels=9_999) == "too_many_pixels"
    assert open_image(small, max_pixels=10_000).size == (100, 100)


def test_error_message_names_the_reason():
    err = ImageDecodeError("truncated", "OSError: image file is truncated")
    assert err.reason == "truncated"
    assert str(err).startswith("truncated:")
