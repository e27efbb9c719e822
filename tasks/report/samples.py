"""The samples stage: a grid of random images of the dataset (``samples.png``) and its artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.report import artifact_key
from tasks.report.pictures import image_grid, markdown_image, save_png
from tasks.sources.stl10 import read_all_images
from tasks.storage import DataRef, RunFolder

SAMPLES_FILE = "samples.png"


def show_samples(dataset: DataRef, run: RunFolder, n_show: int, seed: int) -> Path:
    """Write ``samples.png``: ``n_show`` random images of the dataset, titled with their ids."""
    stage = run.stage(
        "samples", [dataset.fingerprint, dataset.rows, n_show, seed], [SAMPLES_FILE], [__name__]
    )
    if stage.done() is not None:
        return stage.path(SAMPLES_FILE)
    path = stage.path(SAMPLES_FILE)
    images = read_all_images(dataset.uri, dataset.rows)
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(len(images), size=min(n_show, len(images)), replace=False))
    picture = image_grid(images[ids], [f"#{i}" for i in ids])
    save_png(picture, path)
    stage.finish()
    return path


@task(cache_policy=NO_CACHE)
def show(dataset: DataRef, out: str, n_show: int, seed: int) -> str:
    """Prefect task: the dataset preview, also shown in the UI as an artifact."""
    path = show_samples(dataset, RunFolder(Path(out)), n_show, seed)
    with Image.open(path) as picture:
        body = markdown_image(picture, "random images of the dataset")
    create_markdown_artifact(
        key=artifact_key("samples"),
        markdown=f"### {n_show} random images of {Path(dataset.uri).name}\n\n{body}",
        description="A grid of random images from the dataset",
    )
    return str(path)
