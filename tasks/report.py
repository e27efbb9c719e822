"""The report: a table of backends, the notebook's picture of queries and their neighbours
(``results.png``), and a summary a person reads in ten seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.common import DataRef, fingerprint, mark_stage_done, stage_is_done
from tasks.decode import read_all_images
from tasks.embed import Features
from tasks.knn import REFERENCE, SearchRun, load_neighbors
from tasks.show import image_grid, markdown_image, save_png

RESULTS_FILE = "results.png"


def backend_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per backend: device, timings, speedup, deviation, agreement, ties."""
    rows = []
    for name, b in summary["backends"].items():
        if not b["available"]:
            rows.append(
                {"backend": name, "device": b["device"], "status": f"unavailable: {b['reason']}"}
            )
            continue
        rows.append(
            {
                "backend": name,
                "device": b["device"],
                "status": "reference"
                if name == summary["reference"]
                else ("agrees" if b["passed"] else "DISAGREES"),
                "fit s": round(b["fit_seconds"], 4),
                "search s": round(b["search_seconds"], 4),
                "speedup (search)": round(b["speedup_search"], 2) if b["speedup_search"] else None,
                "max deviation": b.get("max_abs_deviation", 0.0),
                "error vs exact": b["max_abs_error_vs_exact"],
                "index agreement": round(b.get("index_agreement", 1.0), 6),
                "ties": b.get("rows_tied", 0),
                "cores used": b["cores_used"],
            }
        )
    return rows


def results_picture(
    images: np.ndarray,
    query_ids: np.ndarray,
    distances: np.ndarray,
    neighbor_ids: np.ndarray,
    n_results: int,
    seed: int,
) -> Image.Image:
    """``n_results`` random queries, each followed by its k neighbours titled with the distance.

    images: (N, 96, 96, 3) uint8; query_ids (n,), distances/neighbor_ids (n, k).
    """
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(query_ids), size=min(n_results, len(query_ids)), replace=False))
    k = distances.shape[1]
    tiles, titles = [], []
    for r in rows:
        tiles.append(images[query_ids[r]])
        titles.append(f"query #{query_ids[r]}")
        for j in range(k):
            tiles.append(images[neighbor_ids[r, j]])
            titles.append(f"d={distances[r, j]:.4g}")
    return image_grid(np.stack(tiles), titles, columns=k + 1, scale=2)


def summary_markdown(summary: dict[str, Any], features: Features, dataset: DataRef) -> str:
    """A ten-second summary: data, model, backends, verdict, speedup."""
    model = features.model
    lines = [f"## image-search: {dataset.rows:,} images from `{Path(dataset.uri).name}`", ""]
    if model.get("random_init"):
        lines += [
            "> **Warning:** ResNet50 ran with **random weights** (`--weights none`). The search "
            "is exact, but the features are not meaningful image descriptors.",
            "",
        ]
    lines.append(
        f"- **Model**: ResNet50 (no top, max pooling), weights `{model.get('weights')}`, "
        f"{features.index.rows:,} index / {features.query.rows:,} query images, "
        f"k = {summary['k']}; embedding on: {features.device}."
    )
    for name, b in summary["backends"].items():
        if not b["available"]:
            lines.append(f"- **{name}**: unavailable: {b['reason']}")
    if "cuml" not in summary["compared"]:
        lines.append("- **GPU backend unavailable**: no GPU backend ran; CPU backends only.")
    if summary["compared"]:
        verdict = "agree" if summary["passed"] else "DISAGREE"
        for name in summary["compared"]:
            b = summary["backends"][name]
            lines.append(
                f"- **{name} vs {REFERENCE}: {verdict if b['passed'] else 'DISAGREE'}** — max "
                f"distance deviation {b['max_abs_deviation']:.3g} (tolerance {b['tolerance']}), "
                f"{b['index_agreement']:.4%} of neighbour ids equal, {b['rows_tied']} tied rows, "
                f"{b['rows_mismatched']} mismatched; search {b['speedup_search']:.2f}× "
                f"faster than {REFERENCE} ({b['search_seconds']:.3f} s vs "
                f"{summary['backends'][REFERENCE]['search_seconds']:.3f} s)."
            )
    else:
        lines.append(f"- Only {REFERENCE} ran: nothing to compare.")
    return "\n".join(lines) + "\n"


def make_report(
    summary: dict[str, Any],
    runs: list[SearchRun],
    features: Features,
    dataset: DataRef,
    out: Path,
    n_results: int,
    seed: int,
) -> tuple[Path, str, list[dict[str, Any]]]:
    """Write ``results.png`` from the first accelerated backend (else the reference).

    Returns (picture path, markdown summary, table rows).
    """
    shown = next((r for r in runs if r.available and r.backend != REFERENCE), None)
    shown = shown or next(r for r in runs if r.backend == REFERENCE)
    path = out / RESULTS_FILE
    key = fingerprint("results-v1", shown.model_dump(), dataset.fingerprint, n_results, seed)
    if stage_is_done(out, "results", key, [path]) is None:
        qids, dist, nids = load_neighbors(shown)
        images = read_all_images(dataset.uri, dataset.rows)
        save_png(results_picture(images, qids, dist, nids, n_results, seed), path)
        mark_stage_done(out, "results", key)
    return path, summary_markdown(summary, features, dataset), backend_table(summary)


@task(cache_policy=NO_CACHE)
def report(
    summary: dict[str, Any],
    runs: list[SearchRun],
    features: Features,
    dataset: DataRef,
    out: str,
    n_results: int,
    seed: int,
) -> str:
    """Prefect task: the table, the picture and the summary as artifacts of the run."""
    path, markdown, table = make_report(
        summary, runs, features, dataset, Path(out), n_results, seed
    )
    create_table_artifact(key="backends", table=table, description="KNN backends compared")
    with Image.open(path) as picture:
        body = markdown_image(picture, "queries and their nearest neighbours")
    create_markdown_artifact(key="summary", markdown=markdown, description="What this run found")
    create_markdown_artifact(
        key="results",
        markdown=f"### Queries (left) and their nearest neighbours\n\n{body}\n\n`{path}`",
        description="Random queries with their neighbours and distances",
    )
    return markdown
