"""Picture grids of images: the dataset preview (``samples.png``) and its Prefect artifact."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.common import DataRef, atomic_path, fingerprint, mark_stage_done, stage_is_done
from tasks.decode import read_all_images

SAMPLES_FILE = "samples.png"
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


def show_samples(dataset: DataRef, out: Path, n_show: int, seed: int) -> Path:
    """Write ``samples.png``: ``n_show`` random images of the dataset, titled with their ids."""
    path = out / SAMPLES_FILE
    key = fingerprint("show-v1", dataset.fingerprint, dataset.rows, n_show, seed)
    if stage_is_done(out, "show", key, [path]) is not None:
        return path
    images = read_all_images(dataset.uri, dataset.rows)
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(len(images), size=min(n_show, len(images)), replace=False))
    picture = image_grid(images[ids], [f"#{i}" for i in ids])
    save_png(picture, path)
    mark_stage_done(out, "show", key)
    return path


@task(cache_policy=NO_CACHE)
def show(dataset: DataRef, out: str, n_show: int, seed: int) -> str:
    """Prefect task: the dataset preview, also shown in the UI as an artifact."""
    path = show_samples(dataset, Path(out), n_show, seed)
    with Image.open(path) as picture:
        body = markdown_image(picture, "random images of the dataset")
    create_markdown_artifact(
        key="samples",
        markdown=f"### {n_show} random images of {Path(dataset.uri).name}\n\n{body}\n\n`{path}`",
        description="A grid of random images from the dataset",
    )
    return str(path)
