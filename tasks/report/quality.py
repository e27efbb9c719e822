"""How good is the search, where labels exist: precision@k, kNN-vote accuracy@k and mAP@10 over
the queries, overall and per class, as ``quality.json`` and a Markdown table.

Everything here works on labels alone: the neighbours' labels, ranked nearest first, and how many
index images carry each label. The caller excludes a query's own image from its neighbours; when
the queries are index images (a collection, leave-one-out), each query's class has one image
fewer to find, and ``leave_one_out`` says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from tasks.storage import write_json_atomic

KS = (1, 3, 10)
MAP_AT = 10

TIE_RULE = (
    "kNN vote: the label held by most of the first k neighbours wins; between labels with as "
    "many votes, the label whose best-ranked neighbour is nearest wins. Neighbours without a "
    "label do not vote; a query whose first k neighbours are all unlabelled counts as wrong."
)
AP_RULE = (
    "AP@10 = (1 / min(10, R)) * sum over ranks i <= 10 of P@i * rel_i, with R the number of "
    "index images that carry the query's label; a query with R = 0 scores AP 0 and is counted "
    "in queries_without_relevant. mAP@10 is the mean over all evaluated queries."
)


class ClassQuality(BaseModel):
    """One class's row: its queries' mean metrics (None when the class has no query)."""

    model_config = ConfigDict(frozen=True)

    label: str
    n_queries: int
    n_index: int
    precision: dict[int, float | None]
    accuracy: dict[int, float | None]
    map_at_10: float | None


class Quality(BaseModel):
    """Retrieval quality of one run; the content of ``quality.json``.

    Means are None when no query carries a label. ``precision`` and ``accuracy`` are keyed by
    k; ``ks`` are the k actually evaluated: a requested k larger than the neighbours there are
    (a small index) becomes that number, and ``note`` says so.
    """

    model_config = ConfigDict(frozen=True)

    n_queries: int
    n_queries_unlabelled: int
    n_index_labelled: int
    neighbors_per_query: int
    ks_requested: list[int]
    ks: list[int]
    precision: dict[int, float | None]
    accuracy: dict[int, float | None]
    map_at_10: float | None
    queries_without_relevant: int
    per_class: list[ClassQuality]
    leave_one_out: bool = False
    tie_rule: str = TIE_RULE
    ap_rule: str = AP_RULE
    note: str | None = None


def _is_missing(value: object) -> bool:
    """True for a label that is not there: None, NaN or the empty string."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value == ""


def _encode(labels: np.ndarray, codes: Mapping[str, int]) -> np.ndarray:
    """Integer codes of ``labels`` (any shape) by ``codes``; -1 for a missing label."""
    flat = [-1 if _is_missing(v) else codes[str(v)] for v in labels.ravel().tolist()]
    return np.asarray(flat, dtype=np.int64).reshape(labels.shape)


def _votes_correct(neighbors: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Whether the kNN vote of the first ``k`` neighbour codes equals the query's code.

    neighbors: (q, K) int codes, -1 unlabelled; query: (q,). Returns (q,) bool. Every position
    counts how often its label occurs among the first k; ``argmax`` takes the first position
    with the highest count, i.e. the tied label whose best rank is nearest.
    """
    first = neighbors[:, :k]
    counts = (first[:, :, None] == first[:, None, :]).sum(axis=2)
    counts[first < 0] = 0  # unlabelled neighbours do not vote
    winner = counts.argmax(axis=1)
    rows = np.arange(len(first))
    return (counts[rows, winner] > 0) & (first[rows, winner] == query)


def _mean(values: np.ndarray, mask: np.ndarray) -> float | None:
    """Mean of ``values[mask]``; None when the mask selects nothing."""
    return float(values[mask].mean()) if mask.any() else None


def retrieval_quality(
    query_labels: np.ndarray,
    neighbor_labels: np.ndarray,
    index_label_counts: Mapping[str, int],
    ks: Sequence[int] = KS,
    leave_one_out: bool = False,
) -> Quality:
    """Precision@k, kNN-vote accuracy@k and mAP@10, overall and per class.

    Parameters
    ----------
    query_labels : ndarray of shape (n_queries,)
        Class names; a missing one (None, NaN, "") skips the query and is counted.
    neighbor_labels : ndarray of shape (n_queries, K)
        The labels of each query's neighbours, nearest first, ties already broken; a missing
        label is never relevant and never votes. ``K >= max(ks)`` unless the index holds fewer
        images, in which case every k above K is evaluated at K (``note`` says so).
    index_label_counts : mapping of shape {label: n_index_images}
        How many index images carry each label: the R of AP@10.
    ks : sequence of int, default (1, 3, 10)
    leave_one_out : bool, default False
        The queries are index images left out of their own answers: R of AP@10 is the count
        of the query's label minus one, and the index holds one image fewer to find.

    Returns
    -------
    Quality
        Means over the evaluated queries; ``per_class`` has one row per label seen in the
        queries or the index, sorted by label.
    """
    q_labels = np.asarray(query_labels, dtype=object)
    n_labels = np.asarray(neighbor_labels, dtype=object)
    if q_labels.ndim != 1 or n_labels.ndim != 2 or n_labels.shape[0] != q_labels.shape[0]:
        raise ValueError(
            f"Expected query_labels of shape (q,) and neighbor_labels of shape (q, K), but "
            f"got {q_labels.shape} and {n_labels.shape}"
        )
    requested = sorted({int(k) for k in ks})
    if not requested or requested[0] < 1:
        raise ValueError(f"Expected ks to be positive integers, but ks = {list(ks)}")
    big_k = n_labels.shape[1]
    n_index = int(sum(index_label_counts.values()))
    findable = n_index - int(leave_one_out)
    needed = max(requested[-1], MAP_AT)
    if big_k < 1 or (big_k < needed and findable > big_k):
        raise ValueError(
            f"Expected at least max(max(ks), {MAP_AT}) = {needed} neighbours per query (or all "
            f"{findable} labelled index images), but neighbor_labels has K = {big_k}"
        )
    evaluated = sorted({min(k, big_k) for k in requested})
    note = None
    if big_k < needed:
        note = (
            f"only {big_k} neighbours per query (the index holds {big_k + int(leave_one_out)} "
            f"images{', the query among them' if leave_one_out else ''}): "
            f"k above {big_k} is evaluated at k = {big_k}"
        )

    names = sorted(
        {str(v) for v in q_labels.tolist() if not _is_missing(v)}
        | {str(v) for v in n_labels.ravel().tolist() if not _is_missing(v)}
        | {str(k) for k in index_label_counts}
    )
    codes = {name: i for i, name in enumerate(names)}
    query = _encode(q_labels, codes)
    keep = query >= 0
    query, neighbors = query[keep], _encode(n_labels, codes)[keep]
    n_per_class = np.array([int(index_label_counts.get(name, 0)) for name in names], np.int64)

    relevant = neighbors == query[:, None]  # (q, K)
    hits = np.cumsum(relevant, axis=1)
    precision = {k: hits[:, k - 1] / k for k in evaluated}
    accuracy = {k: _votes_correct(neighbors, query, k) for k in evaluated}

    depth = min(MAP_AT, big_k)
    r = n_per_class[query] - int(leave_one_out)
    p_at_i = hits[:, :depth] / np.arange(1, depth + 1)
    ap_sum = (p_at_i * relevant[:, :depth]).sum(axis=1)
    ap = np.where(r > 0, ap_sum / np.maximum(np.minimum(MAP_AT, r), 1), 0.0)

    per_class = []
    for code, name in enumerate(names):
        mine = query == code
        per_class.append(
            ClassQuality(
                label=name,
                n_queries=int(mine.sum()),
                n_index=int(n_per_class[code]),
                precision={k: _mean(v, mine) for k, v in precision.items()},
                accuracy={k: _mean(v.astype(np.float64), mine) for k, v in accuracy.items()},
                map_at_10=_mean(ap, mine),
            )
        )
    everyone = np.ones(len(query), dtype=bool)
    return Quality(
        n_queries=len(query),
        n_queries_unlabelled=int((~keep).sum()),
        n_index_labelled=n_index,
        neighbors_per_query=big_k,
        ks_requested=requested,
        ks=evaluated,
        precision={k: _mean(v, everyone) for k, v in precision.items()},
        accuracy={k: _mean(v.astype(np.float64), everyone) for k, v in accuracy.items()},
        map_at_10=_mean(ap, everyone),
        queries_without_relevant=int((r == 0).sum()),
        per_class=per_class,
        leave_one_out=leave_one_out,
        note=note,
    )


def labels_of(ids: np.ndarray, catalog_ids: np.ndarray, catalog_labels: np.ndarray) -> np.ndarray:
    """The labels of image ``ids`` (any shape) from the catalog's (n,) ids and (n,) labels.

    Returns an object array of the shape of ``ids``. Raises ValueError naming the first ids
    the catalog lacks, or when the catalog repeats an id.
    """
    ids = np.asarray(ids, dtype=np.int64)
    cat_ids = np.asarray(catalog_ids, dtype=np.int64)
    cat_labels = np.asarray(catalog_labels, dtype=object)
    if cat_ids.shape != cat_labels.shape or cat_ids.ndim != 1:
        raise ValueError(
            f"Expected catalog ids and labels of one shape (n,), but got {cat_ids.shape} and "
            f"{cat_labels.shape}"
        )
    order = np.argsort(cat_ids, kind="stable")
    sorted_ids = cat_ids[order]
    if sorted_ids.size > 1 and np.any(sorted_ids[1:] == sorted_ids[:-1]):
        dup = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]][:5].tolist()
        raise ValueError(f"The catalog lists image ids more than once: {dup}")
    flat = ids.ravel()
    at = np.clip(np.searchsorted(sorted_ids, flat), 0, max(len(sorted_ids) - 1, 0))
    found = sorted_ids[at] == flat if sorted_ids.size else np.zeros(flat.shape, dtype=bool)
    if not found.all():
        missing = np.unique(flat[~found])
        raise ValueError(
            f"{missing.size} image id(s) are not in the catalog, e.g. {missing[:5].tolist()}; "
            f"the features and the catalog come from different runs: run again to rebuild both."
        )
    return cat_labels[order[at]].reshape(ids.shape)


def write_quality(path: Path, quality: Quality) -> None:
    """Write ``quality`` as pretty JSON at ``path``, atomically."""
    write_json_atomic(path, quality.model_dump(mode="json"))


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def quality_markdown(quality: Quality) -> str:
    """The quality as Markdown for a Prefect artifact: one overall row, then one row per class.

    Means are shown with 3 decimals; every digit is in ``quality.json``.
    """
    ks = quality.ks
    head = (
        ["class", "queries"]
        + [f"P@{k}" for k in ks]
        + [f"acc@{k}" for k in ks]
        + [f"mAP@{MAP_AT}", "index images"]
    )

    def row(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    lines = [
        "## Retrieval quality",
        "",
        row(head),
        row(["---"] * len(head)),
        row(
            ["**all**", str(quality.n_queries)]
            + [_fmt(quality.precision[k]) for k in ks]
            + [_fmt(quality.accuracy[k]) for k in ks]
            + [_fmt(quality.map_at_10), str(quality.n_index_labelled)]
        ),
    ]
    for c in quality.per_class:
        lines.append(
            row(
                [c.label.replace("|", "\\|"), str(c.n_queries)]
                + [_fmt(c.precision.get(k)) for k in ks]
                + [_fmt(c.accuracy.get(k)) for k in ks]
                + [_fmt(c.map_at_10), str(c.n_index)]
            )
        )
    lines.append("")
    notes = [quality.tie_rule, quality.ap_rule]
    if quality.leave_one_out:
        notes.insert(0, "Queries are index images, each left out of its own answer.")
    if quality.n_queries_unlabelled:
        notes.insert(0, f"{quality.n_queries_unlabelled} queries without a label were skipped.")
    if quality.queries_without_relevant:
        notes.insert(
            0,
            f"{quality.queries_without_relevant} queries have no index image of their class "
            f"(AP 0).",
        )
    if quality.note:
        notes.insert(0, quality.note[0].upper() + quality.note[1:] + ".")
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
