"""The samples stage: a grid of random images of the dataset (``samples.png``) and its artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.catalog import load_pixels, read_catalog
from tasks.layout import SAMPLES, SAMPLES_FILE
from tasks.report import artifact_key
from tasks.report.pictures import image_grid, markdown_image, save_png
from tasks.storage import RunFolder
from tasks.types import DataRef


def show_samples(catalog: DataRef, run: RunFolder, n_show: int, seed: int) -> Path:
    """Write ``samples.png``: ``n_show`` random images of the catalog, titled with their ids."""
    stage = run.stage(SAMPLES, [catalog.fingerprint, catalog.rows, n_show, seed], code=[__name__])
    if stage.done() is not None:
        return stage.path(SAMPLES_FILE)
    path = stage.path(SAMPLES_FILE)
    cat = read_catalog(Path(catalog.uri))
    all_ids = np.sort(cat.image_id)
    rng = np.random.default_rng(seed)
    ids = all_ids[np.sort(rng.choice(len(all_ids), size=min(n_show, len(all_ids)), replace=False))]
    picture = image_grid(load_pixels(cat, ids), [f"#{i}" for i in ids])
    save_png(picture, path)
    stage.finish()
    return path


@task(cache_policy=NO_CACHE)
def show(catalog: DataRef, out: str, n_show: int, seed: int) -> str:
    """Prefect task: the dataset preview, also shown in the UI as an artifact."""
    path = show_samples(catalog, RunFolder(Path(out)), n_show, seed)
    with Image.open(path) as picture:
        body = markdown_image(picture, "random images of the dataset")
    create_markdown_artifact(
        key=artifact_key("samples"),
        markdown=f"### {n_show} random images of the collection\n\n{body}",
        description="A grid of random images from the dataset",
    )
    return str(path)
