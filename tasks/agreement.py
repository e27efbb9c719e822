"""Whether two exact backends agree on the same queries: distances against the reference's, and
neighbour ids equal except where float32 arithmetic cannot tell the candidates apart.

Two exact backends that compute distances in float32 (scikit-learn, FAISS, cuML: the expansion
``|q|² + |x|² − 2 q·x``) may rank two images differently when their distances differ by less
than float32 can resolve; both answers are then right. A row whose ids differ is a *tie* when,
rank by rank, the exact (float64) distances of the two answers differ by no more than twice the
larger of the two backends' float32 distance error bounds on that row
(:func:`tasks.search.core.float32_distance_error`: its norms, the dimension, the unit
roundoff). Anything beyond
is a wrong answer and fails the run.

Why twice the bound: if a backend's computed squared distances are within ``E`` of the exact
ones, the j-th smallest exact squared distance among its k answers lies between ``D_(j)²`` and
``D_(j)² + 2E`` (``D_(j)``: the true j-th distance; an image returned too early and one missed
are each within ``E`` of their computed values). Two answers thus differ at rank j by at most
``2E`` in squared distance, ``2E / (a + b)`` in distance: at most twice the distance bound at
the mean ``(a + b) / 2``, ``E`` taken from the backend with the larger unit roundoff.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel

from tasks.errors import ImageSearchError
from tasks.features.store import load_features
from tasks.search.core import U32, U_ACC, float32_distance_error
from tasks.types import Features

EXACT_CHUNK = 512
MAX_LISTED_TIES = 100  # tied rows listed per backend in compare.json (all are counted)
TIE_RULE = (
    "A row whose neighbour ids differ from the reference's is a tie when, rank by rank, the "
    "exact distances of the two answers (sorted) differ by no more than twice the larger of the "
    "two backends' float32 distance error bounds for that row: gamma_(d+2) (|q| + |x|)^2 on "
    "squared distances, with |x| at most min(largest index norm, |q| + the row's largest "
    "distance). Rows beyond the bound are mismatches and fail the run."
)


def unit_roundoff(device: str) -> float:
    """The unit roundoff allowed for a backend's float32 arithmetic on ``device``."""
    return U_ACC if device == "gpu" else U32


ExactDistances = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ExactReference:
    """Exact float64 distances between queries and chosen index images, from the stored float32
    features, and the norms that bound what float32 arithmetic can get wrong on them.

    ``exact(query_ids (m,), neighbor_ids (m, k)) -> (m, k)`` float64. Used to decide ties and
    to measure each backend's own error.
    """

    index_ids: np.ndarray
    index: np.ndarray
    query_ids: np.ndarray
    queries: np.ndarray
    max_norm: float

    @property
    def dim(self) -> int:
        return int(self.index.shape[1])

    def _rows(self, ids: np.ndarray, all_ids: np.ndarray) -> np.ndarray:
        """Row positions of ``ids`` in ``all_ids``."""
        order = np.argsort(all_ids)
        pos = order[np.clip(np.searchsorted(all_ids, ids, sorter=order), 0, len(order) - 1)]
        if not np.array_equal(all_ids[pos], ids):
            raise ImageSearchError("a backend returned image ids that are not in the features")
        return np.asarray(pos)

    def __call__(self, qids: np.ndarray, nids: np.ndarray) -> np.ndarray:
        out = np.empty(nids.shape, dtype=np.float64)
        for start in range(0, len(qids), EXACT_CHUNK):
            stop = start + EXACT_CHUNK
            q = self.queries[self._rows(qids[start:stop], self.query_ids)].astype(np.float64)
            x = self.index[self._rows(nids[start:stop], self.index_ids)].astype(np.float64)
            out[start:stop] = np.sqrt(((x - q[:, None, :]) ** 2).sum(axis=-1))
        return out

    def query_norms(self, qids: np.ndarray) -> np.ndarray:
        """|q| (m,) float64 of queries ``qids`` (m,)."""
        q = self.queries[self._rows(qids, self.query_ids)].astype(np.float64)
        return np.asarray(np.sqrt(np.einsum("ij,ij->i", q, q)))

    def error_bound(
        self, qids: np.ndarray, distances: np.ndarray, far: np.ndarray, u: float = U32
    ) -> np.ndarray:
        """What float32 evaluation can get wrong (n, k) on exact distances (n, k) of queries
        ``qids`` (n,): :func:`float32_distance_error` with every candidate's norm at most the
        index's largest and at most ``|q| + far`` (triangle inequality; ``far`` (n,): the
        largest distance of any candidate that matters on the row)."""
        qn = self.query_norms(qids)
        x = np.broadcast_to(np.minimum(self.max_norm, qn + far)[:, None], distances.shape)
        return float32_distance_error(qn, x, self.dim, distances, u=u)


def exact_distances_from(features: Features) -> ExactReference:
    """The :class:`ExactReference` of a run's feature files."""
    index_ids, index = load_features(features.index.path)
    query_ids, queries = load_features(features.query.path)
    norms = np.einsum("ij,ij->i", index, index, dtype=np.float64) if len(index) else np.zeros(1)
    return ExactReference(index_ids, index, query_ids, queries, float(np.sqrt(norms.max())))


@dataclass(frozen=True)
class Ties:
    """How each row of a backend's answer compares with the reference's, on exact distances.

    Attributes
    ----------
    differs, is_tie : ndarray of shape (n,), bool
    gap : ndarray of shape (n,), float64
        Largest rank-by-rank difference of the two answers' sorted exact distances (0 where
        the ids are equal, or where they differ but the distances are equal: duplicates).
    bound : ndarray of shape (n,), float64
        The float32 bound at the rank that came closest to it (0 where the ids are equal).
    rank : ndarray of shape (n,), int64
        That rank, 1-based (0 where the ids are equal).
    """

    differs: np.ndarray
    is_tie: np.ndarray
    gap: np.ndarray
    bound: np.ndarray
    rank: np.ndarray


def tie_rows(
    ref_i: np.ndarray,
    got_i: np.ndarray,
    query_ids: np.ndarray,
    exact: ExactReference,
    u_ref: float = U32,
    u_got: float = U32,
) -> Ties:
    """Classify rows whose neighbour ids differ, on exact distances and the float32 bound.

    ref_i, got_i: (n_queries, k) neighbour ids; query_ids: (n_queries,); ``u_ref``, ``u_got``:
    the unit roundoff of each backend's float32 arithmetic. Reported float32 distances decide
    nothing here: their own rounding (scikit-learn's reached 0.15 for identical images) would
    hide or invent ties. See the module docstring for the rule and why it is sound.
    """
    n = len(ref_i)
    differs = np.any(ref_i != got_i, axis=1)
    is_tie = np.zeros(n, dtype=bool)
    gap, bound = np.zeros(n), np.zeros(n)
    rank = np.zeros(n, dtype=np.int64)
    rows = np.flatnonzero(differs)
    if rows.size:
        q = query_ids[rows]
        e_ref = np.sort(exact(q, ref_i[rows]), axis=1)
        e_got = np.sort(exact(q, got_i[rows]), axis=1)
        mean, far = (e_ref + e_got) / 2, np.maximum(e_ref[:, -1], e_got[:, -1])
        limits = [exact.error_bound(q, mean, far, u) for u in (u_ref, u_got)]
        allowed = 2.0 * np.maximum(*limits)
        diff = np.abs(e_got - e_ref)
        with np.errstate(divide="ignore", invalid="ignore"):
            used = np.where(allowed > 0, diff / allowed, np.where(diff > 0, np.inf, 0.0))
        worst = np.argmax(used, axis=1)
        pick = np.arange(rows.size)
        gap[rows] = diff[pick, worst]
        bound[rows] = allowed[pick, worst]
        rank[rows] = worst + 1
        is_tie[rows] = np.all(diff <= allowed, axis=1)
    return Ties(differs, is_tie, gap, bound, rank)


def error_vs_exact(
    distances: np.ndarray, ids: np.ndarray, query_ids: np.ndarray, exact: ExactDistances
) -> float:
    """Largest absolute error of a backend's reported distances (n, k) against exact ones."""
    if not distances.size:
        return 0.0
    return float(np.abs(distances.astype(np.float64) - exact(query_ids, ids)).max())


class WorstQuery(BaseModel):
    """The query whose answer deviates most (a mismatched one first), with both answers, their
    exact distances, and the rank where they are furthest apart against the float32 bound."""

    query_id: int
    reference_ids: list[int]
    reference_distances: list[float]
    reference_exact_distances: list[float]
    backend_ids: list[int]
    backend_distances: list[float]
    backend_exact_distances: list[float]
    rank: int = 0
    gap: float = 0.0
    bound: float = 0.0


class TiedRow(BaseModel):
    """A row whose ids differ at exact distances that differ too, by no more than the float32
    bound: at ``rank`` the sorted exact distances are ``gap`` apart, ``bound`` is allowed."""

    query_id: int
    reference_ids: list[int]
    backend_ids: list[int]
    rank: int
    gap: float
    bound: float


class Agreement(BaseModel):
    """How one backend's answer compares with the reference's, on the same queries.

    ``rows_tied`` = ``rows_tied_exact`` (other ids at equal exact distances: duplicates)
    + ``rows_tied_float32`` (exact distances differ within the float32 bound, listed in
    ``float32_ties``, closest calls first, at most :data:`MAX_LISTED_TIES`).
    ``max_rel_deviation`` divides by the exact distance, or by its float32 bound where that is
    larger (an exact duplicate's distance of 0 may come back as anything up to the bound);
    ``abs_deviation_over_median_distance`` is None when the median distance is 0.
    """

    max_abs_deviation: float
    max_rel_deviation: float
    median_neighbor_distance: float
    abs_deviation_over_median_distance: float | None
    index_agreement: float
    rows_identical: int
    rows_tied: int
    rows_tied_exact: int
    rows_tied_float32: int
    rows_mismatched: int
    tie_rule: str = TIE_RULE
    unit_roundoff: dict[str, float]
    float32_ties: list[TiedRow]
    tolerance: float
    distances_pass: bool
    passed: bool
    worst_query: WorstQuery | None


def _relative(
    dev: np.ndarray, ref_exact: np.ndarray, query_ids: np.ndarray, exact: ExactReference, u: float
) -> float:
    """Largest ``dev / max(D, bound(D))`` (0 for an empty answer); never infinite."""
    if not dev.size:
        return 0.0
    bound = exact.error_bound(query_ids, ref_exact, ref_exact[:, -1], u)
    scale = np.maximum(ref_exact, bound)
    rel = np.divide(dev, scale, out=np.zeros_like(dev), where=scale > 0)
    return float(rel.max())


def compare_one(
    ref_d: np.ndarray,
    ref_i: np.ndarray,
    got_d: np.ndarray,
    got_i: np.ndarray,
    query_ids: np.ndarray,
    tolerance: float,
    exact: ExactReference,
    u_ref: float = U32,
    u_got: float = U32,
) -> Agreement:
    """Deviation, agreement and ties of one backend against the reference.

    ref_*/got_*: (n_queries, k) distances (float32) and neighbour ids (int64); ``u_ref``,
    ``u_got``: the unit roundoff of each backend's float32 arithmetic (:func:`unit_roundoff`).
    """
    if ref_d.shape != got_d.shape:
        raise ValueError(f"shapes differ: reference {ref_d.shape}, backend {got_d.shape}")
    dev = np.abs(got_d.astype(np.float64) - ref_d.astype(np.float64))
    scale = float(np.median(ref_d)) if ref_d.size else 0.0
    ties = tie_rows(ref_i, got_i, query_ids, exact, u_ref, u_got)
    mismatched = ties.differs & ~ties.is_tie
    by_float32 = ties.is_tie & (ties.gap > 0)
    worst_row = int(np.argmax(dev.max(axis=1))) if dev.size else 0
    if mismatched.any():
        rows = np.flatnonzero(mismatched)
        worst_row = int(rows[np.argmax(ties.gap[rows] / np.maximum(ties.bound[rows], 1e-300))])
    max_abs = float(dev.max()) if dev.size else 0.0
    worst = None
    if len(query_ids):
        q = query_ids[worst_row : worst_row + 1]
        worst = WorstQuery(
            query_id=int(q[0]),
            reference_ids=ref_i[worst_row].tolist(),
            reference_distances=ref_d[worst_row].tolist(),
            reference_exact_distances=exact(q, ref_i[worst_row : worst_row + 1])[0].tolist(),
            backend_ids=got_i[worst_row].tolist(),
            backend_distances=got_d[worst_row].tolist(),
            backend_exact_distances=exact(q, got_i[worst_row : worst_row + 1])[0].tolist(),
            rank=int(ties.rank[worst_row]),
            gap=float(ties.gap[worst_row]),
            bound=float(ties.bound[worst_row]),
        )
    listed = np.flatnonzero(by_float32)
    listed = listed[np.argsort(-ties.gap[listed] / ties.bound[listed], kind="stable")]
    ref_exact = np.sort(exact(query_ids, ref_i), axis=1) if ref_i.size else dev
    return Agreement(
        max_abs_deviation=max_abs,
        max_rel_deviation=_relative(dev, ref_exact, query_ids, exact, u_ref),
        median_neighbor_distance=scale,
        abs_deviation_over_median_distance=max_abs / scale if scale > 0 else None,
        index_agreement=float(np.mean(ref_i == got_i)) if ref_i.size else 1.0,
        rows_identical=int((~ties.differs).sum()),
        rows_tied=int(ties.is_tie.sum()),
        rows_tied_exact=int((ties.is_tie & ~by_float32).sum()),
        rows_tied_float32=int(by_float32.sum()),
        rows_mismatched=int(mismatched.sum()),
        unit_roundoff={"reference": u_ref, "backend": u_got},
        float32_ties=[
            TiedRow(
                query_id=int(query_ids[r]),
                reference_ids=ref_i[r].tolist(),
                backend_ids=got_i[r].tolist(),
                rank=int(ties.rank[r]),
                gap=float(ties.gap[r]),
                bound=float(ties.bound[r]),
            )
            for r in listed[:MAX_LISTED_TIES]
        ],
        tolerance=tolerance,
        distances_pass=bool(max_abs <= tolerance),
        passed=bool(max_abs <= tolerance and not mismatched.any()),
        worst_query=worst,
    )
