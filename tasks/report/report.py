"""The results stage: a table of backends, the picture of queries and their neighbours
(``results.png``), and a summary a person reads in ten seconds (with the catalog's counts and
first errors), as artifacts of the run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.catalog import first_errors, load_pixels, read_catalog, read_errors
from tasks.compare import Comparison
from tasks.layout import ERRORS_FILE, RESULTS, RESULTS_FILE
from tasks.report import artifact_key
from tasks.report.pictures import image_grid, markdown_image, save_png
from tasks.search.backends import REFERENCE, SearchRun
from tasks.search.knn import load_neighbors
from tasks.split import Mode
from tasks.storage import RunFolder
from tasks.types import CatalogRef, DataRef, Features

RANDOM_WEIGHTS = (
    "ResNet50 uses random weights (weights = none): the search is exact, but the features "
    "are not meaningful image descriptors, so neighbours need not look alike. Use "
    "weights = imagenet (or a weights file) for a search by content."
)


def mode_text(mode: Mode, n_index: int, n_queries: int) -> str:
    """Which mode the run was in, and what that means for the index and the queries."""
    if mode == "collection":
        which = "every one of them" if n_queries >= n_index else f"a seeded sample of {n_queries:,}"
        return (
            f"Collection mode: every usable image ({n_index:,}) is in the index, so each one can "
            f"be found. The backends were compared, and quality measured, by searching "
            f"{which}, each left out of its own answer (leave-one-out)."
        )
    return (
        f"STL-10 benchmark: the index holds {n_index:,} images and {n_queries:,} held-out "
        f"images query it (a seeded split, or STL-10's own train/test sets); the query images "
        f"are not in the index."
    )


def _sig(x: float | None, digits: int = 3) -> float | None:
    """``x`` rounded to ``digits`` significant digits (None stays None)."""
    return None if x is None else float(f"{x:.{digits}g}")


def backend_table(summary: Comparison) -> list[dict[str, Any]]:
    """One row per backend, verdict first: status, speedup, agreement, ties, then timings.

    Numbers are rounded to what a reader compares; every digit is in ``compare.json``.
    """
    rows: list[dict[str, Any]] = []
    # The reference, then the others that ran, then the unavailable ones, each by name: the
    # same order whether the comparison was just made or read back from compare.json.
    order = sorted(
        summary.backends.items(),
        key=lambda nb: (nb[0] != summary.reference, not nb[1].available, nb[0]),
    )
    for name, b in order:
        if not b.available:
            rows.append({"backend": name, "status": f"unavailable: {b.reason}", "device": b.device})
            continue
        a = b.agreement
        if name == summary.reference:
            status = "reference" if b.passed else "WRONG DISTANCES"
        else:
            status = "agrees" if b.passed else "DISAGREES"
        rows.append(
            {
                "backend": name,
                "status": status,
                "speedup": _sig(b.speedup_search),
                "agreement": round(a.index_agreement, 4) if a else 1.0,
                "ties": a.rows_tied if a else 0,
                "search s": _sig(b.search_seconds),
                "fit s": _sig(b.fit_seconds),
                "max deviation": _sig(a.max_abs_deviation, 2) if a else 0.0,
                "error vs exact": _sig(b.max_abs_error_vs_exact, 2),
                "device": b.device,
            }
        )
    return rows


def results_picture(
    load: Callable[[np.ndarray], np.ndarray],
    query_ids: np.ndarray,
    distances: np.ndarray,
    neighbor_ids: np.ndarray,
    n_results: int,
    seed: int,
) -> Image.Image:
    """``n_results`` random queries, each followed by its k neighbours titled with the distance.

    load: image ids (m,) -> (m, 96, 96, 3) uint8; query_ids (n,), distances/neighbor_ids (n, k).
    """
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(query_ids), size=min(n_results, len(query_ids)), replace=False))
    k = distances.shape[1]
    ids, titles = [], []
    for r in rows:
        ids.append(query_ids[r])
        titles.append(f"query #{query_ids[r]}")
        for j in range(k):
            ids.append(neighbor_ids[r, j])
            titles.append(f"d={distances[r, j]:.4g}")
    return image_grid(load(np.asarray(ids, dtype=np.int64)), titles, columns=k + 1, scale=2)


def summary_markdown(
    summary: Comparison, features: Features, catalog: DataRef, source: str | None = None
) -> str:
    """A ten-second summary: data, model, backends, verdict, speedup."""
    model = features.model
    where = source or Path(catalog.uri).name
    lines = [f"## image-search: {catalog.rows:,} images from `{where}`", ""]
    if model.get("random_init"):
        lines += [f"> **Warning:** {RANDOM_WEIGHTS}", ""]
    lines += [f"- **Mode**: {mode_text(summary.mode, features.index.rows, summary.n_queries)}"]
    lines.append(
        f"- **Model**: ResNet50 (no top, max pooling), weights `{model.get('weights')}`, "
        f"{features.index.rows:,} index / {features.query.rows:,} query images, "
        f"k = {summary.k}; embedding on: {features.device}."
    )
    for name, b in summary.backends.items():
        if not b.available:
            lines.append(f"- **{name}**: unavailable: {b.reason}")
    if "cuml" not in summary.compared:
        lines.append("- **GPU backend unavailable**: no GPU backend ran; CPU backends only.")
    ref = summary.backends[summary.reference]
    for name in summary.compared:
        b = summary.backends[name]
        a = b.agreement
        assert a is not None
        speed = (
            f"search {b.speedup_search:.2f}× faster than {REFERENCE} ({b.search_seconds:.3f} s "
            f"vs {ref.search_seconds:.3f} s)"
            if b.speedup_search is not None
            and b.search_seconds is not None
            and ref.search_seconds is not None
            else "speed not measured"
        )
        lines.append(
            f"- **{name} vs {REFERENCE}: {'agree' if b.passed else 'DISAGREE'}** — max "
            f"distance deviation {a.max_abs_deviation:.3g} (tolerance {a.tolerance}), "
            f"{a.index_agreement:.4%} of neighbour ids equal, {a.rows_tied} tied rows "
            f"({a.rows_tied_float32} within the float32 bound), {a.rows_mismatched} mismatched; "
            f"{speed}."
        )
    if not summary.compared:
        lines.append(f"- Only {REFERENCE} ran: nothing to compare.")
    if summary.failure:
        lines.append(f"- **FAILED**: {summary.failure}")
    return "\n".join(lines) + "\n"


def make_report(
    summary: Comparison,
    runs: list[SearchRun],
    features: Features,
    catalog: DataRef,
    run: RunFolder,
    n_results: int,
    seed: int,
) -> tuple[Path, str, list[dict[str, Any]]]:
    """Write ``results.png`` from the first accelerated backend (else the reference).

    Returns (picture path, markdown summary, table rows).
    """
    shown = next((r for r in runs if r.available and r.backend != REFERENCE), None)
    shown = shown or next(r for r in runs if r.backend == REFERENCE)
    stage = run.stage(
        RESULTS,
        [shown.model_dump(exclude={"path"}), catalog.fingerprint, n_results, seed],
        code=[__name__, "tasks.report.pictures"],
    )
    cat = read_catalog(Path(catalog.uri))
    if stage.done() is None:
        qids, dist, nids = load_neighbors(shown, run.out)
        picture = results_picture(
            lambda ids: load_pixels(cat, ids), qids, dist, nids, n_results, seed
        )
        save_png(picture, stage.path(RESULTS_FILE))
        stage.finish()
    path = stage.path(RESULTS_FILE)
    source = str(cat.meta.get("collection", {}).get("source", "")) or None
    markdown = summary_markdown(summary, features, catalog, source)
    if isinstance(catalog, CatalogRef):
        markdown += catalog_markdown(catalog, Path(catalog.uri).parent / ERRORS_FILE)
    return path, markdown, backend_table(summary)


def catalog_markdown(catalog: CatalogRef, errors_path: Path) -> str:
    """What the catalog pass did, and the first per-image problems."""
    s = catalog.stats
    text = (
        f"- **Catalog**: {s.get('listed', 0):,} images listed, {s.get('embedded', 0):,} embedded "
        f"this run, {s.get('unchanged', 0):,} unchanged, {s.get('duplicates', 0):,} duplicate "
        f"contents, {s.get('removed', 0):,} removed, **{catalog.n_errors:,} errors**.\n"
    )
    if catalog.n_errors and errors_path.is_file():
        for line in first_errors(read_errors(errors_path)):
            text += f"  - `{line}`\n"
    return text


@task(cache_policy=NO_CACHE)
def report(
    summary: Comparison,
    runs: list[SearchRun],
    features: Features,
    catalog: DataRef,
    out: str,
    n_results: int,
    seed: int,
) -> str:
    """Prefect task: the table, the picture and the summary as artifacts of the run; returns
    the picture's path."""
    path, markdown, table = make_report(
        summary, runs, features, catalog, RunFolder(Path(out)), n_results, seed
    )
    create_table_artifact(
        key=artifact_key("backends"),
        table=table,
        description="KNN backends compared (every number in compare.json)",
    )
    with Image.open(path) as picture:
        body = markdown_image(picture, "queries and their nearest neighbours")
    create_markdown_artifact(
        key=artifact_key("summary"), markdown=markdown, description="What this run found"
    )
    create_markdown_artifact(
        key=artifact_key("results"),
        markdown=f"### Queries (left) and their nearest neighbours\n\n{body}",
        description="Random queries with their neighbours and distances",
    )
    return str(path)
