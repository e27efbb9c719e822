"""The evaluate stage: how good the search is where labels exist (``quality.json``), and which
index images are (near) duplicates of each other (``duplicates.parquet``, ``duplicates.png``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.catalog import Catalog, load_pixels, read_catalog
from tasks.features.store import load_features
from tasks.layout import DUPLICATES_FILE, EVALUATE, GALLERY_FILE, QUALITY_FILE
from tasks.report import artifact_key
from tasks.report.duplicates import (
    MAX_GALLERY_PAIRS,
    Duplicates,
    duplicates_gallery,
    near_duplicates,
    write_duplicates,
)
from tasks.report.pictures import markdown_image, save_png
from tasks.report.quality import (
    MAP_AT,
    Quality,
    labels_of,
    quality_markdown,
    retrieval_quality,
    write_quality,
)
from tasks.search.exact import prepare_index, search_prepared
from tasks.storage import RunFolder
from tasks.types import CatalogRef, Features

log = logging.getLogger(__name__)


def evaluate_quality(
    cat: Catalog,
    index_ids: np.ndarray,
    index_emb: np.ndarray,
    features: Features,
) -> Quality:
    """Retrieval quality of the query side against the index ((n,) ids, (n, 2048) float32),
    by the catalog's labels, from an exact search of each query's nearest ``MAP_AT`` (10)."""
    query_ids, query_emb = load_features(features.query.path)
    k = min(MAP_AT, len(index_ids))
    _, pos = search_prepared(prepare_index(index_emb), query_emb, k)
    labels = np.asarray(cat.label, dtype=object)
    index_labels = labels_of(index_ids, cat.image_id, labels)
    present = np.array([lab is not None for lab in index_labels], dtype=bool)
    names, counts = np.unique(index_labels[present].astype(str), return_counts=True)
    return retrieval_quality(
        labels_of(query_ids, cat.image_id, labels),
        index_labels[pos],
        dict(zip(names.tolist(), counts.tolist(), strict=True)),
    )


def evaluate(
    catalog: CatalogRef, features: Features, run: RunFolder
) -> tuple[Quality | None, dict[str, Any], Path]:
    """Write ``quality.json`` (when the catalog has labels), ``duplicates.parquet`` and
    ``duplicates.png``, unless a run already did for the same catalog and features.

    Returns (quality or None, the duplicates' summary, the gallery's path).
    """
    outputs = [DUPLICATES_FILE, GALLERY_FILE] + ([QUALITY_FILE] if catalog.labelled else [])
    stage = run.stage(
        EVALUATE.with_outputs(outputs),
        [catalog.fingerprint, features.index.fingerprint, features.query.fingerprint],
        code=[__name__, "tasks.report.quality", "tasks.report.duplicates"],
    )
    done = stage.done()
    if done is None:
        # One read of the catalog and the index for both reports.
        cat = read_catalog(Path(catalog.uri))
        index_ids, index_emb = load_features(features.index.path)
        if catalog.labelled:
            write_quality(
                stage.path(QUALITY_FILE), evaluate_quality(cat, index_ids, index_emb, features)
            )
        dup = near_duplicates(index_ids, index_emb)
        write_duplicates(stage.path(DUPLICATES_FILE), dup)
        save_png(gallery(cat, dup), stage.path(GALLERY_FILE))
        done = stage.finish(duplicates=dup.summary())
    quality = (
        Quality.model_validate_json(stage.path(QUALITY_FILE).read_text())
        if catalog.labelled
        else None
    )
    return quality, dict(done["duplicates"]), stage.path(GALLERY_FILE)


def gallery(cat: Catalog, dup: Duplicates) -> Image.Image:
    """The closest pairs side by side (at most :data:`MAX_GALLERY_PAIRS`)."""
    m = min(dup.n_pairs, MAX_GALLERY_PAIRS)
    a, b = dup.image_id_a[:m], dup.image_id_b[:m]
    return duplicates_gallery(
        load_pixels(cat, a), load_pixels(cat, b), dup.distance[:m], np.stack([a, b], axis=1)
    )


@task(cache_policy=NO_CACHE)
def evaluate_task(catalog: CatalogRef, features: Features, out: str) -> dict[str, object]:
    """Prefect task: quality and duplicates as artifacts; returns their summaries."""
    quality, dup, picture_path = evaluate(catalog, features, RunFolder(Path(out)))
    summary: dict[str, object] = {"duplicates": dup}
    if quality is not None:
        create_markdown_artifact(
            key=artifact_key("quality"),
            markdown=quality_markdown(quality),
            description="Retrieval quality by label: precision@k, kNN-vote accuracy, mAP@10",
        )
        summary["quality"] = quality.model_dump(exclude={"per_class"})
    with Image.open(picture_path) as picture:
        body = markdown_image(picture, "closest pairs of index images")
    n_pairs = int(dup.get("n_pairs", 0))
    create_markdown_artifact(
        key=artifact_key("duplicates"),
        markdown=(
            f"### {n_pairs} near-duplicate pairs ({dup.get('n_exact')} exact), distance ≤ "
            f"{dup.get('threshold')}\n\n{body if n_pairs else ''}"
        ),
        description="Pairs of index images closer than the threshold",
    )
    return summary
