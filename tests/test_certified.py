"""tasks.search.certified against a float64 brute force on adversarial data: the same neighbours
(ties by lower position) and distances, the bound itself, the fallback, the formats."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.search.certified import (
    FORMATS,
    CertifiedStats,
    choose_format,
    engines,
    formats,
    prepare_certified,
    search_certified,
)
from tasks.search.certified import search as csearch
from tasks.search.certified.bound import dot_interval
from tasks.search.certified.index import CertifiedIndex
from tasks.search.core import lowest_k
from tasks.search.exact import exact_knn

RTOL = 1e-6  # distances are measured in float64 and rounded once to float32
ATOL = 1e-44  # ...where float32 is subnormal, that rounding is absolute (2^-149 apart)


def reference(index: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """All float64 Euclidean distances, shape (n_queries, n_index), from difference vectors."""
    out = np.empty((len(queries), len(index)))
    x = index.astype(np.float64)
    for i, q in enumerate(queries.astype(np.float64)):
        diff = x - q
        out[i] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out


def assert_identical(dist: np.ndarray, pos: np.ndarray, full: np.ndarray, k: int) -> None:
    """Positions equal to a stable sort of the float64 distances; distances within RTOL."""
    ref_pos = np.argsort(full, axis=1, kind="stable")[:, :k]
    assert dist.shape == pos.shape == (full.shape[0], k)
    assert dist.dtype == np.float32 and pos.dtype == np.int64
    bad = np.flatnonzero((pos != ref_pos).any(axis=1))
    assert bad.size == 0, f"rows {bad[:5]}: {pos[bad[:2]]} != {ref_pos[bad[:2]]}"
    np.testing.assert_allclose(
        dist, np.take_along_axis(full, ref_pos, axis=1), rtol=RTOL, atol=ATOL
    )


def adversarial(d: int, seed: int, signed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """An index and queries built to defeat a reduced-precision pass.

    Exact duplicates (groups of 6), near-ties below any 16-bit format's resolution (pairs that
    differ in their largest element by 1e-4 of it: the same int8/bfloat16/float16 image, yet
    apart in float32, so the exact path resolves them too), rows and queries scaled by 1e3 and
    1e-3, all-zero rows and an all-zero query, queries that copy or slightly move rows.
    """
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((600, d)).astype(np.float32)
    if not signed:
        base = np.maximum(base, 0) * 2
    dup = np.repeat(base[:40], 6, axis=0)  # 40 groups of 6 identical rows
    near = base[40:140].copy()
    twin = near.copy()
    j = np.abs(near).argmax(axis=1)  # a large element: the twins stay apart in float32
    twin[np.arange(len(twin)), j] *= np.float32(1 + 1e-4)  # invisible to int8/bf16/fp16
    huge, tiny = base[140:200] * 1e3, base[200:260] * 1e-3
    zeros = np.zeros((5, d), dtype=np.float32)
    index = np.concatenate([dup, near, twin, huge, tiny, zeros, base[260:]]).astype(np.float32)
    index = index[rng.permutation(len(index))]
    picks = rng.choice(len(index), size=60, replace=False)
    moved = index[picks[:30]] + rng.normal(0, 0.01, size=(30, d)).astype(np.float32)
    queries = np.concatenate(
        [
            index[picks[30:]],  # copies: distance 0, ties with their duplicates
            moved,
            base[:10] * 1e3,
            base[:10] * 1e-3,
            np.zeros((1, d), dtype=np.float32),
            rng.standard_normal((20, d)).astype(np.float32) * (1 if signed else 0.5),
        ]
    ).astype(np.float32)
    if not signed:
        np.abs(queries, out=queries)
    return index, queries


def resnet_like(n: int, d: int, seed: int) -> np.ndarray:
    """Non-negative, sparse-ish features shaped like ResNet's pooled outputs: 100 classes of
    gamma-distributed prototypes, each image the max over 4 views of a noisy ReLU, 30 % of
    channels dropped."""
    rng = np.random.default_rng(seed)
    protos = rng.gamma(0.6, 1.0, size=(100, d)).astype(np.float32)[rng.integers(0, 100, n)]
    feats = np.zeros((n, d), dtype=np.float32)
    for _ in range(4):
        view = np.exp(np.float32(0.35) * rng.standard_normal((n, d), dtype=np.float32))
        view *= protos
        view -= np.float32(0.3)
        np.maximum(feats, view, out=feats)  # also the ReLU: feats starts at zero
    feats *= rng.random((n, d), dtype=np.float32) > 0.3
    return feats


@pytest.fixture(scope="module")
def unsigned_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    index, queries = adversarial(37, seed=1)  # d not a multiple of 16
    return index, queries, reference(index, queries)


@pytest.fixture(scope="module")
def signed_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    index, queries = adversarial(50, seed=2, signed=True)
    return index, queries, reference(index, queries)


@pytest.fixture(scope="module")
def prepared_unsigned(
    unsigned_case: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> dict[str, CertifiedIndex]:
    return {fmt: prepare_certified(unsigned_case[0], fmt) for fmt in FORMATS}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k", [1, 3, 10, 100])
def test_adversarial_non_negative_data_matches_float64(
    unsigned_case: tuple[np.ndarray, np.ndarray, np.ndarray],
    prepared_unsigned: dict[str, CertifiedIndex],
    fmt: str,
    k: int,
) -> None:
    _, queries, full = unsigned_case
    stats = CertifiedStats()
    dist, pos = search_certified(prepared_unsigned[fmt], queries, k, stats=stats)
    assert_identical(dist, pos, full, k)
    assert stats.queries == len(queries)
    assert stats.candidate_factor >= 1.0
    if fmt in ("float32", "float16"):
        assert stats.fallback == 0, "these formats resolve every query here"
    else:  # queries 1e3 x larger than their neighbours' spacing exceed int8/bf16 resolution
        assert stats.certified >= 0.8 * len(queries), stats.as_dict()


@pytest.mark.parametrize("fmt", FORMATS)
def test_adversarial_signed_data_matches_float64(
    signed_case: tuple[np.ndarray, np.ndarray, np.ndarray], fmt: str
) -> None:
    index, queries, full = signed_case
    prepared = prepare_certified(index, fmt)
    for k in (1, 6, 40):
        dist, pos = search_certified(prepared, queries, k, block=23)
        assert_identical(dist, pos, full, k)


def test_near_ties_below_the_formats_resolution_are_ordered_exactly() -> None:
    # Rows 1 and 2 have the same int8, bfloat16 and float16 images; row 2 is nearer to q.
    d = 24
    index = np.ones((6, d), dtype=np.float32)
    index[0] *= 3
    index[2, 5] = np.float32(1 + 2e-5)
    index[3:] *= 0.5
    query = np.full((1, d), 1.5, dtype=np.float32)
    full = reference(index, query)
    assert full[0, 2] < full[0, 1]
    for fmt in FORMATS:
        stats = CertifiedStats()
        dist, pos = search_certified(prepare_certified(index, fmt), query, 3, stats=stats)
        assert pos[0].tolist() == [2, 1, 3], fmt
        np.testing.assert_allclose(dist[0], full[0, [2, 1, 3]], rtol=RTOL)
        assert stats.certified == 1


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("fmt", FORMATS)
def test_extreme_magnitudes_are_exact_without_warnings(fmt: str) -> None:
    """Subnormal rows, zero rows and rows near float32's range: scores could overflow, so those
    queries take the exact path (float64 where even float32 scores could overflow)."""
    rng = np.random.default_rng(6)
    index = np.abs(rng.standard_normal((300, 20))).astype(np.float32)
    index[:30] *= np.float32(1e-41)  # subnormal
    index[30:40] = 0
    queries = np.concatenate([index[:3], index[35:37], np.abs(rng.standard_normal((4, 20)))])
    queries = queries.astype(np.float32)
    for top in (1.0, 3e35):
        index[40:45] = np.abs(rng.standard_normal((5, 20))) * np.float32(top)
        stats = CertifiedStats()
        dist, pos = search_certified(prepare_certified(index, fmt), queries, 4, stats=stats)
        assert_identical(dist, pos, reference(index, queries), 4)
        assert (stats.fallback == len(queries)) == (top > 1), stats.as_dict()


@pytest.mark.parametrize("fmt", ["int8", "bfloat16"])
def test_k_up_to_1000(fmt: str) -> None:
    rng = np.random.default_rng(3)
    index = np.maximum(rng.standard_normal((1500, 40)), 0).astype(np.float32)
    index[700:760] = index[0]  # a tie group straddling the k-th place for some queries
    queries = np.concatenate([index[:5], np.abs(rng.standard_normal((5, 40)))]).astype(np.float32)
    full = reference(index, queries)
    dist, pos = search_certified(prepare_certified(index, fmt), queries, 1000)
    assert_identical(dist, pos, full, 1000)


def test_forced_fallback_takes_the_exact_path(
    unsigned_case: tuple[np.ndarray, np.ndarray, np.ndarray],
    prepared_unsigned: dict[str, CertifiedIndex],
) -> None:
    _, queries, full = unsigned_case
    k = 3
    stats = CertifiedStats()
    # Candidate sets may hold only k rows: every query whose set is larger falls back.
    dist, pos = search_certified(
        prepared_unsigned["int8"], queries, k, max_candidates=k, stats=stats
    )
    assert 0 < stats.fallback < stats.queries
    assert stats.fallback_fraction == stats.fallback / len(queries)
    assert_identical(dist, pos, full, k)


def test_bound_is_sound_for_every_row(
    unsigned_case: tuple[np.ndarray, np.ndarray, np.ndarray],
    prepared_unsigned: dict[str, CertifiedIndex],
) -> None:
    """The threshold's claim, checked on every (query, row): a score above its threshold means
    the row is farther than the k-th distance of the k rows used to set it."""
    _, queries, full = unsigned_case
    k = 4
    for fmt, ix in prepared_unsigned.items():
        qb = formats.reduce_queries(np, ix.fmt, queries, ix.reduced_norm_max)
        raw = np.empty((len(queries), ix.n_index), dtype=ix.engine.out_dtype)
        ix.engine(qb.values, qb.zero_point, raw)
        t = csearch.scores(ix, raw, qb.scale)
        first = lowest_k(np, t, k)
        d0 = np.take_along_axis(full, first, axis=1).max(axis=1)
        b = ix.bound
        w = d0 * (1 + 4 * b.delta) + qb.eps
        c_q = (w * w - qb.reduced_norm**2 * (1 - b.beta)) / 2 + b.eta
        theta = c_q[:, None] + w[:, None] * ix.err[None, :] + ix.g[None, :]
        excluded = t > theta
        assert (full[excluded] > np.repeat(d0, excluded.sum(axis=1))).all(), fmt
        # ...and the bound is not vacuous: most rows are excluded without being measured.
        assert excluded.mean() > 0.5, fmt


@pytest.fixture(scope="module")
def resnet_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    feats = resnet_like(4200, 2048, seed=4)
    index, queries = feats[:4000], feats[4000:]
    return index, queries, *exact_knn(index, queries, 3)


def test_float32_dot_stage_keeps_every_possible_neighbour() -> None:
    """Candidates closer than float32 can tell apart all survive to the float64 re-rank
    (step 7), and the interval holds every exact distance."""
    rng = np.random.default_rng(7)
    d = 300
    base = np.abs(rng.standard_normal((1, d))).astype(np.float32) * 40
    index = np.repeat(base, 64, axis=0)
    index[1::2, 0] = np.nextafter(index[1::2, 0], np.float32(np.inf))  # 1 ulp apart
    index[40:] += np.abs(rng.standard_normal((24, d))).astype(np.float32)  # clearly farther
    query = base + np.float32(0.25)
    ix = prepare_certified(index, "float32")
    r = np.zeros(64, dtype=np.int64)
    c = np.arange(64, dtype=np.int64)
    q_sq = np.einsum("ij,ij->i", query, query, dtype=np.float64)
    lower, upper = dot_interval(
        np, csearch.dots(np, ix.data, query, r, c), q_sq[r], ix.data_sq[c], d
    )
    full = reference(index, query)[0]
    assert (lower <= full).all() and (full <= upper).all()
    for k in (1, 5, 30):
        kth = np.sort(upper)[k - 1] * (1 + 4 * ix.bound.delta)
        kept = np.flatnonzero(lower <= kth)
        must = np.flatnonzero(full <= np.sort(full)[k - 1])
        assert set(must) <= set(kept.tolist()), k
        assert kept.size <= 40  # the clearly farther rows were dropped


@pytest.mark.parametrize("fmt", ["int8", "bfloat16", "float16"])
def test_resnet_like_features_are_certified(
    resnet_case: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], fmt: str
) -> None:
    index, queries, ref_dist, ref_pos = resnet_case
    stats = CertifiedStats()
    dist, pos = search_certified(prepare_certified(index, fmt), queries, 3, stats=stats)
    assert stats.certified >= 0.95 * len(queries), stats.as_dict()
    assert 1.0 <= stats.candidate_factor < 20, stats.as_dict()
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_allclose(dist, ref_dist, rtol=RTOL)


def test_int8_without_onnxruntime_is_emulated_exactly(
    signed_case: tuple[np.ndarray, np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engines, "ort_available", lambda: "onnxruntime hidden by the test")
    index, queries, _ = signed_case
    ix = prepare_certified(np.abs(index), "int8")
    assert isinstance(ix.engine, engines.ExactInt8Engine)
    assert "emulation" in ix.choice.engine
    dist, pos = search_certified(ix, queries, 7)
    assert_identical(dist, pos, reference(np.abs(index), queries), 7)


def test_block_sizes_and_stats_accumulate(
    unsigned_case: tuple[np.ndarray, np.ndarray, np.ndarray],
    prepared_unsigned: dict[str, CertifiedIndex],
) -> None:
    _, queries, full = unsigned_case
    stats = CertifiedStats()
    results = [
        search_certified(prepared_unsigned["float16"], queries, 5, block=b, stats=stats)
        for b in (1, 7, None)
    ]
    for dist, pos in results:
        assert_identical(dist, pos, full, 5)
    assert stats.queries == 3 * len(queries)
    summary = stats.as_dict()
    assert summary["fallback_fraction"] == 0.0 and summary["candidate_factor"] >= 1.0
    dist, pos = search_certified(prepared_unsigned["float16"], queries[:0], 5)
    assert dist.shape == pos.shape == (0, 5)


def test_choice_is_recorded(prepared_unsigned: dict[str, CertifiedIndex]) -> None:
    ix = prepared_unsigned["int8"]
    assert ix.choice.fmt == "int8" and ix.choice.reason == "requested"
    assert ix.choice.engine and "avx2" in ix.choice.cpu
    assert ix.reduced_nbytes == ix.n_index * ix.dim or "emulation" in ix.choice.engine
    auto = choose_format(np, 64)
    assert auto.fmt in FORMATS and "float32" in auto.rates and auto.rates["float32"] > 0
    assert ("x float32" in auto.reason) or ("no reduced format reached" in auto.reason)
    assert prepare_certified(np.ones((3, 64), dtype=np.float32)).fmt == auto.fmt


def test_onnxruntime_int8_products_are_exact() -> None:
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (optional)")
    rng = np.random.default_rng(5)
    d = 2000
    index = np.abs(rng.standard_normal((300, d))).astype(np.float32)
    index[0] = index.max()  # every level at its top: the int16 pair sums saturate first
    ix = prepare_certified(index, "int8")
    assert isinstance(ix.engine, engines.OrtInt8Engine)
    emulated = engines.ExactInt8Engine(np, formats.reduce_index(np, ix.data, "int8", "rows").values)
    for queries in (np.abs(rng.standard_normal((9, d))), rng.standard_normal((9, d))):
        q = queries.astype(np.float32)
        q[0] = np.abs(q).max()
        qb = formats.reduce_queries(np, ix.fmt, q, ix.reduced_norm_max)
        got = np.empty((9, 300), dtype=np.int32)
        want = np.empty((9, 300), dtype=np.int32)
        ix.engine(qb.values, qb.zero_point, got)
        emulated(qb.values, qb.zero_point, want)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, r"Expected k >= 1, but k = 0"),
        ({"k": 2.5}, r"Expected an integer k, but k = 2\.5"),
        ({"k": 400}, r"Expected k <= n_index, but n_index = 30, k = 400"),
        ({"k": 5, "max_candidates": 2}, r"max_candidates >= k, but max_candidates = 2, k = 5"),
        ({"k": 1, "block": 0}, r"Expected block >= 1 \(queries per block\), but block = 0"),
    ],
)
def test_invalid_search_arguments_name_the_values(kwargs: dict[str, object], match: str) -> None:
    ix = prepare_certified(np.ones((30, 4), dtype=np.float32), "float32")
    with pytest.raises(ValueError, match=match):
        search_certified(ix, np.ones((2, 4), dtype=np.float32), **kwargs)  # type: ignore[arg-type]


def test_invalid_inputs_name_the_values() -> None:
    good = np.ones((5, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=r"Expected fmt in \('auto', 'float32'.*fmt = 'fp8'"):
        prepare_certified(good, "fp8")
    with pytest.raises(ValueError, match=r"index\.ndim = 1"):
        prepare_certified(good[0])
    with pytest.raises(ValueError, match="index contains NaN or infinity"):
        prepare_certified(np.full((5, 4), np.nan, dtype=np.float32), "int8")
    with pytest.raises(ValueError, match=r"Expected a non-empty index, but index\.shape"):
        prepare_certified(good[:0], "float32")
    ix = prepare_certified(good, "float32")
    with pytest.raises(ValueError, match="index has d = 4, queries have d = 3"):
        search_certified(ix, good[:, :3], 1)


@pytest.mark.gpu
def test_cupy_float16_matches_float64(
    unsigned_case: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed (GPU extra)")
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver or no device: CUDARuntimeError varies by version
        pytest.skip(f"no CUDA device: {exc}")
    index, queries, full = unsigned_case
    choice = choose_format(cupy, index.shape[1])
    assert set(choice.rates) == {"float32", "float16"}
    for fmt in ("float16", "float32"):
        ix = prepare_certified(cupy.asarray(index), fmt)
        assert ix.fallback_index is not None
        for k in (1, 3, 100):
            stats = CertifiedStats()
            dist, pos = search_certified(ix, cupy.asarray(queries), k, stats=stats)
            assert isinstance(dist, np.ndarray)
            assert_identical(dist, pos, full, k)
        # Forced fallback: the float32 pass without a candidate cap, on the device.
        stats = CertifiedStats()
        dist, pos = search_certified(ix, cupy.asarray(queries), 3, max_candidates=3, stats=stats)
        assert stats.fallback > 0
        assert_identical(dist, pos, full, 3)


def test_memory_mapped_index_is_not_copied_and_single_queries_are_exact(
    tmp_path: pytest.TempPathFactory,
    unsigned_case: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """The service's use: an int8 copy scanned, candidates re-measured from a memory-mapped
    float32 file; one query (or a few) per call, answers identical to float64."""
    index, queries, full = unsigned_case
    path = tmp_path / "index.f32"  # type: ignore[operator]
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=index.shape)
    mm[:] = index
    mm.flush()
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=index.shape)
    ix = prepare_certified(mapped, "int8")
    assert np.shares_memory(ix.data, mapped)  # re-measured from the map, never copied
    assert ix.fallback_index is not None and np.shares_memory(ix.fallback_index.data, mapped)
    for i in (0, 7, 35, 80):
        dist, pos = search_certified(ix, queries[i : i + 1], 5)
        assert_identical(dist, pos, full[i : i + 1], 5)
    for m in (2, 16):
        dist, pos = search_certified(ix, queries[:m], 3)
        assert_identical(dist, pos, full[:m], 3)
