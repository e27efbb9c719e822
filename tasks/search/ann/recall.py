"""The recall of the approximate index, measured when it is built: the exact answers of a sample
of the index's own rows (block by block), the share of them the approximate answers hold, and
the cheapest search setting that reaches the target on a disjoint tuning sample."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from tasks.search.ann.build import Rows
from tasks.search.ann.index import RECALL_K, TARGET, AnnIndex, Probe, Recall
from tasks.search.core import first_k, measure
from tasks.search.exact import prepare_index, search_prepared

EXACT_ROWS = 16_384  # index rows per block of the exact search that the recall is measured by
LADDER: tuple[tuple[int, int], ...] = (
    (4, 40),
    (8, 50),
    (16, 50),
    (16, 100),
    (32, 100),
    (32, 200),
    (64, 200),
    (64, 400),
    (128, 400),
    (256, 800),
)


def exact_neighbours(rows: Rows, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact ``k`` nearest rows of ``queries`` (m, d): (float64 distances, positions)
    (m, k), by (distance, position), searched block by block of ``rows`` and merged."""
    k = min(k, rows.shape[0])
    best_d = np.full((len(queries), 0), np.inf)
    best_p = np.zeros((len(queries), 0), dtype=np.int64)
    for s, block in rows.blocks(EXACT_ROWS):
        _, p = search_prepared(prepare_index(block), queries, min(k, len(block)))
        d = measure(block, queries, p)  # float64, as the re-rank measures: comparable bits
        best_d = np.concatenate([best_d, d], axis=1)
        best_p = np.concatenate([best_p, p + s], axis=1)
        best_d, best_p = first_k(best_d, best_p, min(k, best_d.shape[1]))
    return best_d, best_p


def _without(pos: np.ndarray, dist: np.ndarray, self_pos: int, k: int) -> tuple[Any, Any]:
    keep = pos != self_pos
    return dist[keep][:k], pos[keep][:k]


def recall_of(
    truth: tuple[np.ndarray, np.ndarray],
    answer: tuple[np.ndarray, np.ndarray],
    sample: np.ndarray,
    k: int = RECALL_K,
) -> float:
    """Mean share of the ``k`` answered rows (each query row left out of its own answer)
    whose distance is at most the exact k-th distance. ``truth`` and ``answer``: (distances,
    positions) of ``k + 1`` neighbours per sampled row."""
    hits = []
    for i, p in enumerate(sample):
        t_dist, _ = _without(truth[1][i], truth[0][i], int(p), k)
        a_dist, _ = _without(answer[1][i], answer[0][i], int(p), k)
        kth = t_dist[-1]
        hits.append(float(np.count_nonzero(a_dist <= kth)) / len(t_dist))
    return float(np.mean(hits)) if hits else 1.0


def tune(
    ann: AnnIndex,
    rows: Rows,
    tuning: np.ndarray,
    measured: np.ndarray,
    *,
    target: float = TARGET,
    seed: int = 0,
    on_step: Callable[[str], None] | None = None,
) -> AnnIndex:
    """Choose the cheapest setting of :data:`LADDER` whose recall on ``tuning`` reaches halfway
    from ``target`` to 1 (the costliest when none does), then measure its recall on
    ``measured`` (disjoint: not used for the choice) and keep both on ``ann``."""
    both = np.concatenate([tuning, measured])
    queries = rows.take(both)
    truth_d, truth_p = exact_neighbours(rows, queries, RECALL_K + 1)
    t = len(tuning)
    n = rows.shape[0]
    wanted = target + (1.0 - target) / 2
    ladder = [p for p in LADDER if p[0] <= ann.design.nlist and p[1] <= n] or [(1, n)]
    chosen, tuned = Probe(*ladder[-1]), 0.0
    for nprobe, count in ladder:
        probe = Probe(nprobe, count)
        got = ann.search(rows.take, queries[:t], RECALL_K + 1, probe)
        tuned = recall_of((truth_d[:t], truth_p[:t]), got, tuning)
        if on_step is not None:
            on_step(f"nprobe {nprobe}, rerank {count}: recall@{RECALL_K} {tuned:.4f}")
        chosen = probe
        if tuned >= wanted:
            break
    got = ann.search(rows.take, queries[t:], RECALL_K + 1, chosen)
    value = recall_of((truth_d[t:], truth_p[t:]), got, measured)
    ann.probe = chosen
    ann.recall = Recall(
        RECALL_K,
        value,
        target,
        [int(p) for p in measured],
        [int(p) for p in tuning],
        tuned,
        seed,
    )
    return ann
