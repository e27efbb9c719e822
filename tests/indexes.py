"""Generated image folders and the indexes built from them by the batch run's own stages:
what the query, service and reliability tests ask (the shared one is conftest's ``built``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tasks.ask import open_index
from tasks.features import store
from tasks.layout import INDEX_FEATURES as FEATURES
from tasks.search.exact import exact_knn

# Far below the distance between two different generated images (tens), far above the float32
# difference between a batch of 32 and a batch of one through the same network (~1e-4).
SELF = 1e-3


def write_images(folder: Path, n: int, start: int = 0) -> list[Path]:
    """``n`` visually distinct images (hue, stripe frequency and angle per image, some noise),
    non-square, as PNG and JPEG; the i-th is the same whatever ``start`` is."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    yy, xx = np.mgrid[0:90, 0:120].astype(np.float32)
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        hue = np.array(Image.new("HSV", (1, 1), (i * 37 % 256, 200, 220)).convert("RGB"))[0, 0]
        angle = i * 0.7
        wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (0.1 + 0.05 * (i % 7)))
        pixels = hue[None, None, :] * (0.6 + 0.4 * wave[..., None])
        pixels += rng.normal(0, 8, pixels.shape)
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        path = folder / f"img{i:03d}.{'jpg' if i % 3 == 0 else 'png'}"
        img.save(path, quality=95) if path.suffix == ".jpg" else img.save(path)
        paths.append(path)
    return paths


def build_index(
    images: Path,
    out: Path,
    random_resnet: Any,
    *,
    weights: str = "none",
    input_size: int = 96,
    split_ratio: float = 0.9,
    serving: bool = True,
    reuse_model: bool = True,
) -> None:
    """An index of the images in ``images`` in ``out``, built by the batch run's own stages,
    with the session's random ResNet50 (``reuse_model``; else the model ``weights`` names,
    built); ``serving``: with the memory-mapped copy, its int8 copy and the exported model, as
    a run writes them."""
    import tasks.features.embed
    import tasks.features.serving
    from tasks.features.embed import assemble_features, catalog_collection
    from tasks.layout import run_stages
    from tasks.sources.collection import open_collection
    from tasks.split import split_dataset
    from tasks.storage import RunFolder
    from tasks.types import ModelSpec

    with pytest.MonkeyPatch.context() as mp:
        for module in (tasks.features.embed, tasks.features.serving):
            if reuse_model:
                mp.setattr(module, "build_model", lambda *a, **kw: random_resnet)
        run = RunFolder(out)
        spec = ModelSpec(weights, 0, "float32", input_size)
        cat = catalog_collection(
            open_collection(str(images)), run, spec, batch_size=32, progress=False
        )
        sp = split_dataset(cat, run, split_ratio, 0)
        features = assemble_features(cat, sp, run, spec)
        if serving:
            tasks.features.serving.index_copy(features, run)
            tasks.features.serving.index_compact(features, run, progress=False)
            tasks.features.serving.query_model(spec, run, spec.key())
        run.commit(run_stages([]))


@dataclass
class Built:
    """A folder of images, the index built from it, and which file each index image is."""

    images: Path
    out: Path
    files: dict[int, Path]  # index image id -> its file

    def some(self, n: int) -> list[tuple[int, Path]]:
        return sorted(self.files.items())[:n]


def describe(out: Path) -> dict[int, Path]:
    index = open_index(out)
    return {int(i): Path(index.uri(p)) for p, i in enumerate(index.ids)}


def stored_neighbours(out: Path, image_id: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The batch run's answer for an index image: exact search of its stored feature row."""
    ids, emb = store.load_features(out / FEATURES)
    row = int(np.flatnonzero(ids == image_id)[0])
    d, pos = exact_knn(emb, emb[row : row + 1], k)
    return d[0], ids[pos[0]]
