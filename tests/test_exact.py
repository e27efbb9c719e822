"""tasks.search.exact against a float64 NumPy brute force: distances, positions, ties, checks."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.search.core import float32_distance_error
from tasks.search.exact import default_block, exact_knn, prepare_index, search_prepared

# Refined distances are measured in float64 and rounded once to float32.
RTOL, ATOL = 1e-6, 1e-6
# Unrefined ones carry float32 cancellation in |q|² − 2q·x + |x|² (norms here are ~10²).
RTOL_F32, ATOL_F32 = 1e-3, 5e-2


def reference(index: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """All float64 Euclidean distances, shape (n_queries, n_index)."""
    diff = queries[:, None, :].astype(np.float64) - index[None, :, :].astype(np.float64)
    return np.sqrt((diff**2).sum(-1))


def relu_features(n: int, d: int, seed: int) -> np.ndarray:
    """Non-negative float32 features like ResNet max-pool outputs (half of them zero)."""
    rng = np.random.default_rng(seed)
    return (np.maximum(rng.normal(size=(n, d)), 0) * 3).astype(np.float32)


def assert_exact(
    dist: np.ndarray,
    pos: np.ndarray,
    full: np.ndarray,
    k: int,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> None:
    """Distances close to the reference; positions equal to a stable sort's, except at ties."""
    ref_pos = np.argsort(full, axis=1, kind="stable")[:, :k]
    ref_d = np.take_along_axis(full, ref_pos, axis=1)
    assert dist.shape == pos.shape == (full.shape[0], k)
    assert dist.dtype == np.float32 and pos.dtype == np.int64
    np.testing.assert_allclose(dist, ref_d, rtol=rtol, atol=atol)
    # What we returned is what it claims to be: the true distance of the returned position.
    np.testing.assert_allclose(dist, np.take_along_axis(full, pos, axis=1), rtol=rtol, atol=atol)
    assert (np.diff(dist, axis=1) >= 0).all()
    differ = pos != ref_pos
    if differ.any():  # only a tie may reorder or swap neighbours
        rows, cols = np.nonzero(differ)
        tie = np.isclose(
            full[rows, pos[rows, cols]], full[rows, ref_pos[rows, cols]], rtol=rtol, atol=atol
        )
        assert tie.all(), f"non-tied neighbours differ at rows {rows[~tie][:10]}"


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    index = relu_features(400, 48, seed=1)
    index[5] = index[4]  # exact duplicates: equal distances, to be ordered by position
    index[9] = index[4]
    index[17] = index[16]
    queries = np.concatenate([relu_features(37, 48, seed=2), index[3:6], index[16:18]])
    return index, queries, reference(index, queries)


@pytest.mark.parametrize("k", [1, 3, 8, 33, 100, 400])
@pytest.mark.parametrize("block", [None, 1, 7, 1000])
def test_matches_float64_reference(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], k: int, block: int | None
) -> None:
    index, queries, full = data
    dist, pos = exact_knn(index, queries, k, block=block)
    assert_exact(dist, pos, full, k)


@pytest.mark.parametrize("k", [1, 3, 50])
def test_unrefined_float32_distances_are_close(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], k: int
) -> None:
    index, queries, full = data
    dist, pos = exact_knn(index, queries, k, block=5, refine=False)
    assert_exact(dist, pos, full, k, RTOL_F32, ATOL_F32)
    assert (dist >= 0).all()  # negative squared distances were clamped, never NaN


@pytest.mark.parametrize("k", [1, 3, 50])
def test_ties_go_to_the_lower_position(k: int) -> None:
    index = np.zeros((60, 4), dtype=np.float32)  # every row the same: all distances tie
    index[::7] = 1.0
    queries = np.zeros((3, 4), dtype=np.float32)
    dist, pos = exact_knn(index, queries, k, block=2)
    zeros = np.flatnonzero(index[:, 0] == 0)
    np.testing.assert_array_equal(pos, np.tile(zeros[:k], (3, 1)))
    np.testing.assert_array_equal(dist, 0)


def test_query_equal_to_an_index_row_has_distance_zero(
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    index = data[0]
    dist, pos = exact_knn(index, index[[4, 16, 200]], 3)
    np.testing.assert_array_equal(dist[:, 0], 0)  # exact, not float32 cancellation noise
    np.testing.assert_array_equal(pos[:, :2], [[4, 5], [16, 17], [200, pos[2, 1]]])


def test_prepared_index_is_reused_and_matches_the_one_shot_call(
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    index, queries, _ = data
    prepared = prepare_index(index.astype(np.float64)[:, ::1])  # converted once, at fit
    assert prepared.data.dtype == np.float32 and prepared.data.flags.c_contiguous
    np.testing.assert_allclose(prepared.half_sq_norms, (index.astype(np.float64) ** 2).sum(1) / 2)
    for k in (1, 4):
        d1, p1 = search_prepared(prepared, queries, k)
        d2, p2 = exact_knn(index, queries, k)
        np.testing.assert_array_equal(p1, p2)
        np.testing.assert_array_equal(d1, d2)


def test_non_contiguous_and_empty_queries(
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    index, queries, full = data
    dist, pos = exact_knn(index, np.asfortranarray(queries), 2)
    assert_exact(dist, pos, full, 2)
    dist, pos = exact_knn(index, queries[:0], 2)
    assert dist.shape == pos.shape == (0, 2)


def test_default_block_bounds_the_scratch() -> None:
    assert default_block(90_000) * 90_000 * 4 <= 128 * 2**20
    assert default_block(90_000) >= 256  # large enough for GEMM to amortise packing
    assert default_block(10) == 1024
    assert default_block(10**9) == 16


@pytest.mark.parametrize(
    ("index_shape", "query_shape", "k", "match"),
    [
        ((5, 4), (2, 4), 6, r"Expected k <= n_index, but n_index = 5, k = 6"),
        ((5, 4), (2, 4), 0, r"Expected k >= 1, but k = 0"),
        ((5, 4), (2, 4), 2.5, r"Expected an integer k, but k = 2\.5"),
        ((5, 4), (2, 3), 1, r"index has d = 4, queries have d = 3"),
        ((5,), (2, 4), 1, r"index to be a 2-D array .* index\.ndim = 1"),
        ((5, 4), (4,), 1, r"queries to be a 2-D array .* queries\.ndim = 1"),
        ((5, 4, 1), (2, 4), 1, r"index\.ndim = 3, index\.shape = \(5, 4, 1\)"),
        ((0, 4), (2, 4), 1, r"Expected a non-empty index, but index\.shape = \(0, 4\)"),
    ],
)
def test_invalid_input_names_the_values(
    index_shape: tuple[int, ...], query_shape: tuple[int, ...], k: int, match: str
) -> None:
    index = np.ones(index_shape, dtype=np.float32)
    queries = np.ones(query_shape, dtype=np.float32)
    with pytest.raises(ValueError, match=match):
        exact_knn(index, queries, k)


def test_invalid_values_and_block() -> None:
    index = np.ones((5, 4), dtype=np.float32)
    bad = index.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="index contains NaN or infinity"):
        exact_knn(bad, index, 1)
    with pytest.raises(ValueError, match="queries contains NaN or infinity"):
        exact_knn(index, bad * np.inf, 1)
    with pytest.raises(ValueError, match=r"to hold real numbers, but index\.dtype = <U1"):
        exact_knn(np.full((5, 4), "a"), index, 1)
    with pytest.raises(
        ValueError, match=r"Expected block >= 1 \(queries per block\), but block = 0"
    ):
        exact_knn(index, index, 1, block=0)


def float32_expansion(index: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Distances (n_queries, n_index) as a float32 backend computes them: |q|² + |x|² − 2q·x
    in float32, clamped at zero, square root (FAISS IndexFlatL2 and cuML do this)."""
    qq = np.einsum("ij,ij->i", queries, queries)[:, None]
    xx = np.einsum("ij,ij->i", index, index)[None, :]
    sq = (qq + xx) - np.float32(2) * (queries @ index.T)
    return np.sqrt(np.maximum(sq, 0)).astype(np.float32)


def test_float32_distance_error_holds_for_float32_backends() -> None:
    """Computed float32 distances stay within the bound on data made for cancellation: large
    norms, duplicates and near-duplicates of the queries, mixed signs."""
    rng = np.random.default_rng(11)
    d = 96
    queries = (rng.standard_normal((20, d)) * 3 + 200).astype(np.float32)
    index = np.concatenate(
        [
            queries + rng.normal(0, 1e-3, (20, d)),  # near-duplicates: D ~ 1e-2, |q| ~ 2000
            queries,  # duplicates: D = 0
            rng.standard_normal((200, d)) * 50,  # far, mixed signs
            queries[:5] * 1.5,
        ]
    ).astype(np.float32)
    exact = reference(index, queries)
    qn = np.linalg.norm(queries.astype(np.float64), axis=1)
    xn = np.broadcast_to(np.linalg.norm(index.astype(np.float64), axis=1), exact.shape)
    loose = float32_distance_error(qn, xn, d)
    tight = float32_distance_error(qn, xn, d, exact)
    assert loose.shape == tight.shape == exact.shape and (tight <= loose).all()
    computed = [float32_expansion(index, queries)]
    try:
        import faiss

        flat = faiss.IndexFlatL2(d)
        flat.add(index)
        sq, ids = flat.search(queries, len(index))
        faiss_d = np.empty_like(exact)
        np.put_along_axis(faiss_d, ids, np.sqrt(np.maximum(sq, 0)), axis=1)
        computed.append(faiss_d)
    except ImportError:  # pragma: no cover - FAISS is a dependency, but optional here
        pass
    for got in computed:
        err = np.abs(got.astype(np.float64) - exact)
        assert (err <= tight).all(), float((err - tight).max())
        assert err.max() > 0  # the cancellation is real here, the check is not vacuous


def test_float32_distance_error_separates_near_ties_from_wrong_neighbours() -> None:
    """A row whose exact distance exceeds the true neighbour's by less than both rows' bounds
    is a tie for a float32 backend (it may rank it first, and here it does); one beyond the
    bounds is never ranked first, so returning it is a wrong answer."""
    rng = np.random.default_rng(12)
    d, trials = 64, 200
    q = (rng.standard_normal((trials, d)) + 300).astype(np.float32)
    direction = rng.standard_normal((trials, 3, d))
    direction /= np.linalg.norm(direction, axis=2, keepdims=True)
    qn = np.linalg.norm(q.astype(np.float64), axis=1)
    err = float32_distance_error(qn, qn, d, np.ones((trials, 1)))[:, 0]  # at D = 1
    # Row 0 at distance 1 (the neighbour); row 1 inside the bounds; row 2 just outside them.
    gaps = np.stack([np.zeros(trials), 1e-3 * err, 2.2 * err], axis=1)
    rows = q[:, None, :] + (1.0 + gaps)[:, :, None] * direction
    rows = rows.astype(np.float32)
    exact = np.sqrt(((rows.astype(np.float64) - q[:, None, :]) ** 2).sum(-1))
    xn = np.linalg.norm(rows.astype(np.float64), axis=2)
    bound = float32_distance_error(qn, xn, d, exact)
    tie_limit = bound[:, :1] + bound[:, 1:]
    planted_gap = exact[:, 1:] - exact[:, :1]
    assert (planted_gap[:, 0] < tie_limit[:, 0]).all()  # near-ties: inside
    assert (planted_gap[:, 1] > tie_limit[:, 1]).all()  # wrong neighbours: outside
    computed = np.stack(
        [float32_expansion(rows[i], q[i : i + 1])[0] for i in range(trials)]
    ).astype(np.float64)
    assert (computed[:, 2] > computed[:, 0]).all()  # never ranked before the neighbour
    assert (computed[:, 1] < computed[:, 0]).any()  # some near-ties do come out first
