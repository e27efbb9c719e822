"""``report.html``: one self-contained page per run that holds what the run's Prefect artifacts
hold (the verdict, the backends, the catalog's counts, errors and skipped files, quality, near
duplicates, the pictures, the mode and the weights), readable offline after the run: pictures
are embedded as data URIs, nothing is fetched from anywhere.

The page is a pure function of the run's outputs (no clock, no host name), so a rerun with the
same inputs writes the same bytes and the stage skips it.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.catalog import first_errors, read_catalog, read_errors
from tasks.compare import Comparison
from tasks.layout import (
    CATALOG,
    COMPARE_FILE,
    DUPLICATES_FILE,
    ERRORS_FILE,
    NEIGHBORS_FILE,
    QUALITY_FILE,
    REPORT,
    REPORT_FILE,
    SPLIT_FILE,
)
from tasks.report.evaluate import duplicates_markdown
from tasks.report.report import RANDOM_WEIGHTS, backend_table, mode_text
from tasks.storage import RunFolder, atomic_path, read_record
from tasks.types import CatalogRef, Features

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em;
       color: #1b1b1b; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
.verdict { font-size: 1.2em; padding: .6em 1em; border-radius: 4px; margin: 1em 0; }
.passed { background: #e3f4e3; border: 1px solid #6a6; }
.failed { background: #fbe3e3; border: 1px solid #c55; }
.warning { background: #fff4d6; border: 1px solid #d9a400; padding: .6em 1em; }
.mode { background: #eef3fb; border: 1px solid #8aa6d6; padding: .6em 1em; }
img { max-width: 100%; border: 1px solid #ddd; }
code { background: #f3f3f3; padding: 0 .2em; }
"""


def _table(rows: Sequence[Mapping[str, Any]]) -> str:
    """An HTML table of ``rows`` (one dict per row; the columns of all rows, in first-seen
    order), every cell escaped."""
    if not rows:
        return "<p>(none)</p>"
    columns = list(dict.fromkeys(c for row in rows for c in row))
    head = "".join(f"<th>{escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(_cell(row.get(c)))}</td>" for c in columns) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _picture(path: Path | None, alt: str) -> str:
    """``path`` (a PNG) as an embedded image, or a line saying it is missing."""
    if path is None or not path.is_file():
        return f"<p>({escape(alt)}: not written by this run)</p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<p><img alt="{escape(alt)}" src="data:image/png;base64,{data}"></p>'


def verdict_html(summary: Comparison) -> str:
    """The verdict as a box: passed or failed, with the reason and the tie rule's outcome."""
    lines = []
    for name in summary.compared:
        a = summary.backends[name].agreement
        if a is None:
            continue
        verdict = "agree" if summary.backends[name].passed else "DISAGREE"
        lines.append(
            f"{name} vs {summary.reference}: {verdict} on {summary.n_queries:,} queries, "
            f"k = {summary.k}: {a.rows_identical:,} rows identical, {a.rows_tied_exact:,} "
            f"tied at equal distances, {a.rows_tied_float32:,} tied within the float32 bound, "
            f"{a.rows_mismatched:,} mismatched; max distance deviation "
            f"{a.max_abs_deviation:.3g} (tolerance {a.tolerance})."
        )
    if not summary.compared:
        lines.append(f"Only {summary.reference} ran: nothing to compare.")
    head = "PASSED" if summary.passed else "FAILED"
    css = "passed" if summary.passed else "failed"
    parts = [f'<div class="verdict {css}" id="verdict"><strong>Verdict: {head}</strong>']
    parts += [f"<br>{escape(line)}" for line in lines]
    if summary.failure:
        parts.append(f"<br><strong>Why:</strong> {escape(summary.failure)}")
    return "".join(parts) + "</div>"


def catalog_html(
    catalog: CatalogRef,
    stats: Mapping[str, int],
    skipped: Mapping[str, int] | None,
    errors: list[str],
) -> str:
    """The catalog's counts, what the listing passed over by kind (None: the catalog pass did
    not record it), and the first errors."""
    counts = {
        "usable images": catalog.rows,
        "errors": catalog.n_errors,
        "listed": stats.get("listed"),
        "embedded": stats.get("embedded"),
        "unchanged": stats.get("unchanged"),
        "duplicate contents": stats.get("duplicates"),
        "removed": stats.get("removed"),
    }
    html = (
        "<p>Counts of the catalog pass that wrote this catalog (embedded, unchanged and "
        "removed are that pass's own).</p>" + _table([counts])
    )
    if skipped:
        rows = [{"skipped": kind, "files": n} for kind, n in sorted(skipped.items())]
        html += "<p>Files the listing passed over, by kind:</p>" + _table(rows)
    elif skipped is not None:
        html += "<p>The listing passed over no files.</p>"
    if errors:
        html += (
            f"<p>First {len(errors)} of {catalog.n_errors:,} images that could not be used "
            f"(all in <code>{ERRORS_FILE}</code>):</p><ul>"
            + "".join(f"<li><code>{escape(e)}</code></li>" for e in errors)
            + "</ul>"
        )
    return html


def quality_html(quality: Mapping[str, Any] | None, reason: str | None) -> str:
    """Precision, accuracy and mAP@10 overall and per class, or why there are none."""
    if quality is None:
        return (
            f"<p>No retrieval quality (no <code>{QUALITY_FILE}</code>): {escape(reason or '')}.</p>"
        )
    ks = quality.get("ks", [])

    def row(label: str, q: Mapping[str, Any], n_queries: Any, n_index: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"class": label, "queries": n_queries}
        out.update({f"P@{k}": q["precision"].get(str(k)) for k in ks})
        out.update({f"acc@{k}": q["accuracy"].get(str(k)) for k in ks})
        out.update({"mAP@10": q.get("map_at_10"), "index images": n_index})
        return out

    rows = [row("all", quality, quality["n_queries"], quality["n_index_labelled"])]
    rows += [row(c["label"], c, c["n_queries"], c["n_index"]) for c in quality["per_class"]]
    notes = [quality.get("note"), quality.get("tie_rule"), quality.get("ap_rule")]
    if quality.get("leave_one_out"):
        notes.insert(0, "Queries are index images, each left out of its own answer.")
    return _table(rows) + "<ul>" + "".join(f"<li>{escape(n)}</li>" for n in notes if n) + "</ul>"


def render(
    *,
    summary: Comparison,
    features: Features,
    catalog: CatalogRef,
    source: str,
    stats: Mapping[str, int],
    skipped: Mapping[str, int] | None,
    errors: list[str],
    evaluation: Mapping[str, Any],
    pictures: Mapping[str, Path | None],
) -> str:
    """The whole page as one string."""
    model = features.model
    weights = str(model.get("weights", "?"))
    random = bool(model.get("random_init"))
    title = f"image-search: {catalog.rows:,} images from {source}"
    dup = dict(evaluation.get("duplicates", {}))
    mode = mode_text(summary.mode, features.index.rows, summary.n_queries)
    warning = f"<strong>Warning:</strong> {escape(RANDOM_WEIGHTS)}"
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="mode" id="mode">{escape(mode)}</p>',
        f'<p class="warning" id="weights-warning">{warning}</p>' if random else "",
        f"<p>Model: ResNet50 (no top, max pooling), weights <code>{escape(weights)}</code>, "
        f"input {escape(str(model.get('input_size', '?')))} px; {features.index.rows:,} index "
        f"images, {summary.n_queries:,} queries, k = {summary.k}.</p>",
        verdict_html(summary),
        "<h2>Backends</h2>",
        _table(backend_table(summary)),
        f"<p>Every number is in <code>{COMPARE_FILE}</code>; the neighbours of every backend "
        f"in <code>{NEIGHBORS_FILE}</code>.</p>",
        "<h2>Catalog</h2>",
        catalog_html(catalog, stats, skipped, errors),
        "<h2>Retrieval quality</h2>",
        quality_html(evaluation.get("quality"), evaluation.get("quality_reason")),
        "<h2>Near duplicates</h2>",
        f"<p>{escape(duplicates_markdown(dup))} All pairs: <code>{DUPLICATES_FILE}</code>.</p>",
        _picture(pictures.get("duplicates"), "closest pairs of index images"),
        "<h2>Queries and their nearest neighbours</h2>",
        _picture(pictures.get("results"), "queries (left) and their nearest neighbours"),
        "<h2>Random images of the collection</h2>",
        _picture(pictures.get("samples"), "random images of the collection"),
        "<h2>Files</h2>",
        _files_list(evaluation.get("quality") is not None),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
        + "\n".join(part for part in body if part)
        + "</body></html>\n"
    )


def _files_list(quality: bool) -> str:
    """Links to the run's data files beside the page (quality.json only when it was written)."""
    names = [COMPARE_FILE, NEIGHBORS_FILE, SPLIT_FILE, DUPLICATES_FILE, ERRORS_FILE]
    names += [QUALITY_FILE] if quality else []
    return "<ul>" + "".join(f'<li><a href="{n}"><code>{n}</code></a></li>' for n in names) + "</ul>"


def _catalog_record(catalog: CatalogRef) -> dict[str, Any]:
    """The catalog stage's record beside the catalog (in place or staged): what its pass did."""
    record = read_record(Path(catalog.uri).parent, CATALOG.name) or {}
    return dict(record.get("info") or {})


def write_report(
    run: RunFolder,
    summary: Comparison,
    features: Features,
    catalog: CatalogRef,
    evaluation: Mapping[str, Any],
    pictures: Mapping[str, str | Path | None],
) -> Path:
    """Write ``report.html`` unless the same page is there; returns its path."""
    info = _catalog_record(catalog)
    cat_meta = read_catalog(Path(catalog.uri)).meta
    source = str(cat_meta.get("collection", {}).get("source", "")) or Path(catalog.uri).name
    skipped = info.get("skipped", cat_meta.get("skipped"))
    errors_path = Path(catalog.uri).parent / ERRORS_FILE
    errors = (
        first_errors(read_errors(errors_path)) if catalog.n_errors and errors_path.is_file() else []
    )
    page = render(
        summary=summary,
        features=features,
        catalog=catalog,
        source=source,
        stats=dict(info.get("stats") or catalog.stats),
        skipped=None if skipped is None else {str(k): int(v) for k, v in dict(skipped).items()},
        errors=errors,
        evaluation=evaluation,
        pictures={k: Path(v) if v else None for k, v in pictures.items()},
    )
    digest = hashlib.sha256(page.encode()).hexdigest()
    stage = run.stage(REPORT, [digest], code=[__name__])
    if stage.done() is None:
        with atomic_path(stage.path(REPORT_FILE)) as tmp:
            tmp.write_text(page, encoding="utf-8")
        stage.finish()
    return stage.path(REPORT_FILE)


@task(cache_policy=NO_CACHE)
def html_report(
    summary: Comparison,
    features: Features,
    catalog: CatalogRef,
    evaluation: dict[str, Any],
    pictures: dict[str, str],
    out: str,
) -> str:
    """Prefect task: ``report.html`` in the output folder; returns where it will be once the
    run commits its outputs."""
    write_report(RunFolder(Path(out)), summary, features, catalog, evaluation, pictures)
    return str(Path(out) / REPORT_FILE)
