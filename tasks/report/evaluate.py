"""The evaluate stage: how good the search is where labels exist (``quality.json``), and which
index images are (near) duplicates of each other (``duplicates.parquet``, ``duplicates.png``).

In a collection the queries are index images, each left out of its own answer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
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
    gallery_caption,
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
from tasks.search.knn import leave_one_out
from tasks.split import Mode
from tasks.storage import RunFolder
from tasks.types import CatalogRef, Features

log = logging.getLogger(__name__)

NO_LABELS = (
    "the collection carries no labels; quality needs one folder per class (ROOT/CLASS/IMAGE, "
    "two classes or more) or a label column in a list"
)


def quality_reason(catalog: CatalogRef) -> str | None:
    """Why retrieval quality cannot be measured on this catalog (no labels, or a single
    class: every neighbour would be 'right'), or None when it can."""
    if not catalog.labelled:
        return NO_LABELS
    labels = pq.read_table(catalog.uri, columns=["label"]).column("label").drop_null()
    names = {str(v) for v in labels.unique().to_pylist() if v != ""}
    if len(names) < 2:
        only = f" ({next(iter(names))!r})" if names else ""
        return f"every labelled image carries the same label{only}; quality needs two classes"
    return None


def evaluate_quality(
    cat: Catalog,
    index_ids: np.ndarray,
    index_emb: np.ndarray,
    features: Features,
    mode: Mode = "benchmark",
) -> Quality:
    """Retrieval quality of the query side against the index ((n,) ids, (n, 2048) float32),
    by the catalog's labels, from an exact search of each query's nearest ``MAP_AT`` (10); in
    a collection, of its nearest ``MAP_AT`` other images (leave-one-out)."""
    query_ids, query_emb = load_features(features.query.path)
    loo = mode == "collection"
    k = min(MAP_AT + loo, len(index_ids))
    dist, pos = search_prepared(prepare_index(index_emb), query_emb, k)
    if loo:
        _, found = leave_one_out(query_ids, dist, index_ids[pos])
        order = np.argsort(index_ids)
        pos = order[np.searchsorted(index_ids, found, sorter=order)]
    labels = np.asarray(cat.label, dtype=object)
    index_labels = labels_of(index_ids, cat.image_id, labels)
    present = np.array([lab is not None for lab in index_labels], dtype=bool)
    names, counts = np.unique(index_labels[present].astype(str), return_counts=True)
    return retrieval_quality(
        labels_of(query_ids, cat.image_id, labels),
        index_labels[pos],
        dict(zip(names.tolist(), counts.tolist(), strict=True)),
        leave_one_out=loo,
    )


def evaluate(
    catalog: CatalogRef, features: Features, run: RunFolder, mode: Mode = "benchmark"
) -> tuple[Quality | None, str | None, dict[str, Any], Path]:
    """Write ``quality.json`` (when the catalog has labels of two classes or more),
    ``duplicates.parquet`` and ``duplicates.png``, unless a run already did for the same
    catalog and features.

    Returns (quality or None, why there is none, the duplicates' summary, the gallery's path).
    """
    reason = quality_reason(catalog)
    outputs = [DUPLICATES_FILE, GALLERY_FILE] + ([QUALITY_FILE] if reason is None else [])
    stage = run.stage(
        EVALUATE.with_outputs(outputs),
        [catalog.fingerprint, features.index.fingerprint, features.query.fingerprint, mode],
        code=[
            __name__,
            "tasks.report.quality",
            "tasks.report.duplicates",
            "tasks.report.pictures",
        ],
    )
    done = stage.done()
    if done is None:
        # One read of the catalog and the index for both reports.
        cat = read_catalog(Path(catalog.uri))
        index_ids, index_emb = load_features(features.index.path)
        if reason is None:
            write_quality(
                stage.path(QUALITY_FILE),
                evaluate_quality(cat, index_ids, index_emb, features, mode),
            )
        dup = near_duplicates(index_ids, index_emb)
        write_duplicates(stage.path(DUPLICATES_FILE), dup)
        save_png(gallery(cat, dup), stage.path(GALLERY_FILE))
        done = stage.finish(duplicates=dup.summary())
    quality = (
        Quality.model_validate_json(stage.path(QUALITY_FILE).read_text())
        if reason is None
        else None
    )
    return quality, reason, dict(done["duplicates"]), stage.path(GALLERY_FILE)


def gallery(cat: Catalog, dup: Duplicates) -> Image.Image:
    """The closest pairs side by side (at most :data:`MAX_GALLERY_PAIRS`), captioned with how
    many of how many it shows; a picture that says so when there is none."""
    m = min(dup.n_pairs, MAX_GALLERY_PAIRS)
    a, b = dup.image_id_a[:m], dup.image_id_b[:m]
    empty = np.zeros((0, 96, 96, 3), np.uint8)
    return duplicates_gallery(
        load_pixels(cat, a) if m else empty,
        load_pixels(cat, b) if m else empty,
        dup.distance[:m],
        np.stack([a, b], axis=1),
        n_pairs=dup.n_pairs,
        threshold=dup.threshold,
    )


def duplicates_markdown(dup: dict[str, Any]) -> str:
    """One line on the near duplicates: how many, how many exact, the threshold, how many the
    gallery shows."""
    n_pairs = int(dup.get("n_pairs", 0))
    threshold = float(dup.get("threshold", 0.0))
    if not n_pairs:
        return f"No near-duplicate pairs: no two index images within distance {threshold:.3g}."
    shown = gallery_caption(n_pairs, min(n_pairs, MAX_GALLERY_PAIRS), threshold)[0]
    return f"{shown} ({dup.get('n_exact')} exact copies), distance ≤ {threshold:.3g}."


@task(cache_policy=NO_CACHE)
def evaluate_task(
    catalog: CatalogRef, features: Features, out: str, mode: Mode
) -> dict[str, object]:
    """Prefect task: quality and duplicates as artifacts; returns their summaries (and why
    there is no quality, when there is none)."""
    quality, reason, dup, picture_path = evaluate(catalog, features, RunFolder(Path(out)), mode)
    summary: dict[str, object] = {"duplicates": dup, "gallery": str(picture_path)}
    if quality is not None:
        create_markdown_artifact(
            key=artifact_key("quality"),
            markdown=quality_markdown(quality),
            description="Retrieval quality by label: precision@k, kNN-vote accuracy, mAP@10",
        )
        summary["quality"] = quality.model_dump(mode="json")
    else:
        log.info("no quality.json: %s", reason)
        summary["quality_reason"] = reason
    with Image.open(picture_path) as picture:
        body = markdown_image(picture, "closest pairs of index images")
    create_markdown_artifact(
        key=artifact_key("duplicates"),
        markdown=f"### Near duplicates\n\n{duplicates_markdown(dup)}\n\n{body}",
        description="Pairs of index images closer than the threshold",
    )
    return summary
