"""Pictures of images: titled grids, PNG files written atomically, and Markdown that embeds a
picture in a Prefect artifact."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tasks.storage import atomic_path

MAX_EMBED_BYTES = 1_000_000  # the server drops events above ~1.4 MB; base64 adds a third


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType
        return ImageFont.load_default()


CAPTION_LINE = 18  # pixels per line of a picture's caption


def _caption_size(lines: Sequence[str], font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    """Width in pixels that ``lines`` need, padding included."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return int(max((probe.textlength(line, font=font) for line in lines), default=0)) + 8


def image_grid(
    images: np.ndarray,
    titles: Sequence[str] | None = None,
    columns: int = 8,
    scale: int = 1,
    caption: Sequence[str] = (),
) -> Image.Image:
    """Tile images of shape (N, 96, 96, 3) uint8 into one picture, with optional titles above
    each tile and ``caption`` lines above the grid (the picture widens to fit them)."""
    n = len(images)
    rows = max(1, -(-n // columns))
    side = 96 * scale
    title_h = 16 if titles else 0
    pad = 4
    font = _font(12)
    top = CAPTION_LINE * len(caption)
    width = max(columns * (side + pad) + pad, _caption_size(caption, font) if caption else 0)
    grid = Image.new("RGB", (width, top + rows * (side + title_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for j, line in enumerate(caption):
        draw.text((pad, pad + j * CAPTION_LINE), line, fill="black", font=font)
    for i in range(n):
        r, c = divmod(i, columns)
        x, y = pad + c * (side + pad), top + pad + r * (side + title_h + pad)
        tile = Image.fromarray(np.ascontiguousarray(images[i]))
        if scale != 1:
            tile = tile.resize((side, side), Image.Resampling.NEAREST)
        grid.paste(tile, (x, y + title_h))
        if titles:
            draw.text((x + 2, y + 1), titles[i], fill="black", font=font)
    return grid


def text_picture(lines: Sequence[str]) -> Image.Image:
    """A small white picture that says ``lines`` (where there is nothing to show)."""
    font = _font(14)
    width = max(_caption_size(lines, font) + 16, 240)
    picture = Image.new("RGB", (width, 24 * len(lines) + 24), "white")
    draw = ImageDraw.Draw(picture)
    for j, line in enumerate(lines):
        draw.text((12, 12 + 24 * j), line, fill="black", font=font)
    return picture


def save_png(picture: Image.Image, path: Path) -> None:
    """Save ``picture`` as PNG atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        picture.save(f, format="PNG", optimize=True)


def markdown_image(picture: Image.Image, alt: str) -> str:
    """Markdown that embeds ``picture`` inline (JPEG, shrunk until it fits an artifact)."""
    img = picture.convert("RGB")
    while True:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        if buf.tell() <= MAX_EMBED_BYTES or img.width < 200:
            break
        img = img.resize((img.width * 3 // 4, img.height * 3 // 4))
    data = base64.b64encode(buf.getvalue()).decode()
    return f"![{alt}](data:image/jpeg;base64,{data})"
