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


def image_grid(
    images: np.ndarray,
    titles: Sequence[str] | None = None,
    columns: int = 8,
    scale: int = 1,
) -> Image.Image:
    """Tile images of shape (N, 96, 96, 3) uint8 into one picture, with optional titles."""
    n = len(images)
    rows = max(1, -(-n // columns))
    side = 96 * scale
    title_h = 16 if titles else 0
    pad = 4
    grid = Image.new(
        "RGB", (columns * (side + pad) + pad, rows * (side + title_h + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(grid)
    font = _font(12)
    for i in range(n):
        r, c = divmod(i, columns)
        x, y = pad + c * (side + pad), pad + r * (side + title_h + pad)
        tile = Image.fromarray(np.ascontiguousarray(images[i]))
        if scale != 1:
            tile = tile.resize((side, side), Image.Resampling.NEAREST)
        grid.paste(tile, (x, y + title_h))
        if titles:
            draw.text((x + 2, y + 1), titles[i], fill="black", font=font)
    return grid


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
