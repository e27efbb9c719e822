"""Decode one image file and prepare it for the model: the one code path for a batch run, a query
and an upload.

The rule, applied in this order:

1. **Open** with Pillow; animated formats (GIF, WebP, APNG) give their first frame. Files beyond
   Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, 89,478,485 pixels) are refused,
   and so are images smaller than :data:`MIN_SIDE` pixels on a side.
2. **Orient** by the EXIF orientation tag (``ImageOps.exif_transpose``), as a photo viewer does.
3. **Convert to RGB**: grayscale and 16/32-bit grayscale are scaled to 8 bits and repeated over
   three channels; palette images are expanded through their palette; CMYK goes through Pillow's
   conversion; any alpha channel (RGBA, LA, palette transparency) is composited over **white**.
4. **Resize** so that the short side is ``size`` pixels (aspect ratio kept, Pillow's bicubic
   filter with antialiasing), then **centre-crop** to ``size × size``. For JPEG, Pillow's
   ``draft`` lets the decoder scale down by 1/2, 1/4 or 1/8 first, never below ``size``.
   An image enlarged beyond :data:`MAX_ENLARGED_PIXELS` (a very thin one: an 8×200,000 PNG of
   3.5 KB would become 96×2,400,000) is resized only where the crop keeps, with the same
   filter: its pixels may differ from the whole resize by rounding (±2 levels), every other
   image's are exactly the whole resize's.

The result is a (size, size, 3) uint8 array; the model's own preprocessing
(``keras.applications.resnet50.preprocess_input``) follows inside the forward pass. Whatever a
decoder raises on damaged or hostile bytes is :class:`BadImage`, that image's problem alone.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MIN_SIDE = 8  # images with a side shorter than this carry no content worth searching
_ORIENTATION = 0x0112  # the EXIF tag
DEFAULT_INPUT_SIZE = 96  # STL-10's own size; real photos want 224
MAX_ENLARGED_PIXELS = 4 * 2**20  # beyond this, an enlargement is computed only where it is kept
_BICUBIC_SUPPORT = 2.0  # the bicubic filter's reach, in output pixels when enlarging
RESIZE_RULE = (
    "EXIF orientation applied; grayscale/palette/CMYK to RGB, alpha over white; short side "
    "resized to the input size (bicubic, antialiased), centre crop; enlargements beyond 4 "
    "megapixels computed only where the crop keeps"
)


class BadImage(Exception):
    """An image that cannot be used; ``reason`` is one short line for errors.parquet.

    Deliberately not an ``ImageSearchError``: one bad image is data, not a reason to stop.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Decoded:
    """One prepared image: pixels (size, size, 3) uint8, and the original's width and height."""

    pixels: np.ndarray
    width: int
    height: int


def open_image(data: bytes) -> Image.Image:
    """Open ``data`` as an image (first frame), or raise :class:`BadImage` saying why not."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow warns between 1× and 2× its pixel limit and raises beyond: refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.seek(0)
            width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"decompression bomb refused ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise BadImage("not an image Pillow can identify") from exc
    except (OSError, ValueError, EOFError, SyntaxError) as exc:
        raise BadImage(f"unreadable image header ({exc})") from exc
    except Exception as exc:  # a plugin's own error on hostile bytes (DDS, BLP, TIFF...)
        raise BadImage(f"unreadable image header ({type(exc).__name__}: {exc})") from exc
    if min(width, height) < MIN_SIDE:
        raise BadImage(f"too small: {width}×{height} pixels (at least {MIN_SIDE} on each side)")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB by the module's rule (alpha composited over white)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8))
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(scaled.round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def fit(img: Image.Image, size: int) -> np.ndarray:
    """Resize the short side of RGB ``img`` to ``size`` and centre-crop: (size, size, 3) uint8."""
    width, height = img.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    if scale > 1 and new_w * new_h > MAX_ENLARGED_PIXELS:
        return _fit_region(img, size, (new_w, new_h), (left, top))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def _fit_region(
    img: Image.Image, size: int, new: tuple[int, int], corner: tuple[int, int]
) -> np.ndarray:
    """What :func:`fit` gives, computed only for the crop: the source pixels the filter reaches
    for it, resized horizontally then vertically (the whole resize's order), never the whole
    enlarged image."""
    (width, height), (new_w, new_h), (left, top) = img.size, new, corner
    step_x, step_y = width / new_w, height / new_h  # source pixels per output pixel, < 1

    def reach(first: int, step: float, limit: int) -> tuple[int, int]:
        lo = (first + 0.5) * step - _BICUBIC_SUPPORT - 2
        hi = (first + size - 0.5) * step + _BICUBIC_SUPPORT + 2
        return max(0, math.floor(lo)), min(limit, math.ceil(hi))

    (x0, x1), (y0, y1) = reach(left, step_x, width), reach(top, step_y, height)
    part = img.crop((x0, y0, x1, y1))
    across = (left * step_x - x0, 0.0, (left + size) * step_x - x0, float(y1 - y0))
    part = part.resize((size, y1 - y0), Image.Resampling.BICUBIC, box=across)
    down = (0.0, top * step_y - y0, float(size), (top + size) * step_y - y0)
    part = part.resize((size, size), Image.Resampling.BICUBIC, box=down)
    return np.asarray(part, dtype=np.uint8)


def decode_image(data: bytes, size: int = DEFAULT_INPUT_SIZE) -> Decoded:
    """Decode image bytes into model input: (size, size, 3) uint8, by the module's rule.

    Raises :class:`BadImage` for anything that is not a usable image (empty, truncated, not an
    image, a decompression bomb, too small).
    """
    img = open_image(data)
    width, height = img.size
    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
        if orientation in (5, 6, 7, 8):  # stored rotated by 90°
            width, height = height, width
        if img.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers ``size``.
            img.draft("RGB", (size, size))
        img.load()
        if orientation != 1:  # exif_transpose copies the image even when there is nothing to do
            img = ImageOps.exif_transpose(img)
        pixels = fit(to_rgb(img), size)
    except Image.DecompressionBombError as exc:
        raise BadImage(f"decompression bomb refused ({exc})") from exc
    except (OSError, ValueError, EOFError, SyntaxError) as exc:
        raise BadImage(f"damaged image data ({exc})") from exc
    except Exception as exc:  # whatever a decoder raises on hostile bytes: this image's problem
        raise BadImage(f"damaged image data ({type(exc).__name__}: {exc})") from exc
    return Decoded(pixels=pixels, width=width, height=height)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of one (h, w, 3) uint8 image (to show an image that has no file of its own)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
