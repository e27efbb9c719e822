"""Sharded exact search: the exact kernel's tie rule, the merge, the cluster setting, and a real
``distributed.LocalCluster`` (2 worker processes × 1 thread) giving the in-process answer bit
for bit while each worker holds only its shard."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flows.runners import default_shards, task_runner
from flows.sharded import SEARCH_CODE, SHARDED, searcher
from tasks.cluster_setting import ClusterSetting, parse_cluster
from tasks.errors import ImageSearchError, option_name
from tasks.features import store
from tasks.features.model import DIM
from tasks.search.backends import SearchRun
from tasks.search.exact import exact_knn
from tasks.search.knn import load_neighbors, search_features
from tasks.search.shards import (
    ShardResult,
    merge_topk,
    plan_shards,
    search_shard,
    search_sharded_local,
)
from tasks.storage import RunFolder
from tasks.types import DataRef, Features

N_INDEX, N_QUERY, GROUP, K = 3000, 96, 250, 5


def search_features_sharded(
    features: Features, run: RunFolder, k: int, cluster: str | None
) -> SearchRun:
    """The ``sharded`` backend through the one search stage, as the flow runs it."""
    return search_features(features, run, SHARDED, k, searcher(cluster), SEARCH_CODE)


def stable_reference(index: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """All float64 distances (n_queries, n_index) from difference vectors."""
    out = np.empty((len(queries), len(index)))
    index64 = index.astype(np.float64)
    for i, q in enumerate(queries.astype(np.float64)):
        diff = index64 - q
        out[i] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out


def first_k(full: np.ndarray, k: int) -> np.ndarray:
    """Positions of a stable sort's first k per row: the tie rule every search keeps."""
    return np.argsort(full, axis=1, kind="stable")[:, :k]


def planted_features(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ReLU-like features (N_INDEX, DIM) and queries (N_QUERY, DIM) with identical rows planted
    at every query's k-th place in other shards, and near-ties (one ulp apart)."""
    rng = np.random.default_rng(seed)
    index = np.maximum(rng.normal(size=(N_INDEX, DIM)), 0).astype(np.float32)
    queries = np.maximum(rng.normal(size=(N_QUERY, DIM)), 0).astype(np.float32)
    queries[: N_QUERY // 2] = index[rng.choice(N_INDEX, N_QUERY // 2, replace=False)]
    queries[: N_QUERY // 2] += rng.normal(scale=0.05, size=(N_QUERY // 2, DIM)).astype(np.float32)
    order = first_k(stable_reference(index, queries), K)
    taken = set(order.ravel().tolist())
    free = [p for p in rng.permutation(N_INDEX).tolist() if p not in taken]
    for i in range(0, N_QUERY, 2):
        kth = order[i, K - 1]
        for _ in range(3):  # three more copies of the k-th row, anywhere in the file
            index[free.pop()] = index[kth]
        near = free.pop()
        index[near] = index[kth]
        index[near, 0] = np.nextafter(index[near, 0], np.float32(np.inf))
    return index, queries


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    index, queries = planted_features()
    return index, queries, stable_reference(index, queries)


@pytest.fixture(scope="module")
def features(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> Features:
    """Feature files as the store writes them: row groups of 250 rows, ids sorted, not 0..n."""
    index, queries, _ = data
    folder = tmp_path_factory.mktemp("features")
    ids = np.arange(N_INDEX, dtype=np.int64) * 7 + 1000
    qids = np.arange(N_QUERY, dtype=np.int64) + 10**6
    store.write_tables(
        [store.table(ids[i : i + GROUP], index[i : i + GROUP]) for i in range(0, N_INDEX, GROUP)],
        folder / "index.parquet",
        {},
    )
    half = N_QUERY // 2
    store.write_tables(
        [store.table(qids[:half], queries[:half]), store.table(qids[half:], queries[half:])],
        folder / "query.parquet",
        {},
    )
    ref = DataRef(uri=str(folder / "index.parquet"), rows=N_INDEX, fingerprint="i")
    qref = DataRef(uri=str(folder / "query.parquet"), rows=N_QUERY, fingerprint="q")
    return Features(index=ref, query=qref, model={}, device="cpu")


@pytest.fixture(scope="module")
def dask_address() -> Iterator[str]:
    """One real LocalCluster for the module: 2 worker processes × 1 thread."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        yield str(cluster.scheduler_address)


# --- the exact kernel honours the tie rule ---------------------------------------------------


def test_kernel_orders_identical_rows_at_the_kth_place_by_position(
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """Identical rows round differently in float32 GEMM tiles; the kernel still returns a stable
    sort's first k of the float64 distances (the lower position among identical rows)."""
    index, queries, full = data
    for k in (1, K, K + 1, 40):
        dist, pos = exact_knn(index, queries, k)
        np.testing.assert_array_equal(pos, first_k(full, k))
        np.testing.assert_allclose(dist, np.take_along_axis(full, pos, axis=1), rtol=1e-6)


def test_kernel_many_identical_rows_take_the_proven_path() -> None:
    """Twenty identical rows at the k-th place (more than the extra candidates): the lowest
    positions win, every one of them."""
    rng = np.random.default_rng(3)
    index = np.maximum(rng.normal(size=(500, 256)), 0).astype(np.float32)
    q = index[:1] + np.float32(0.01)
    kth = first_k(stable_reference(index, q), 3)[0, 2]
    copies = np.sort(rng.choice(np.setdiff1d(np.arange(500), [kth]), 20, replace=False))
    index[copies] = index[kth]
    full = stable_reference(index, q)
    _, pos = exact_knn(index, q, 3)
    np.testing.assert_array_equal(pos, first_k(full, 3))


# --- shards and the merge --------------------------------------------------------------------


def test_plan_cuts_whole_row_groups_balanced(features: Features) -> None:
    shards = plan_shards(features.index.path, 5)
    assert [s.rows for s in shards] == [500, 750, 500, 750, 500]
    assert shards[0].row_start == 0 and shards[-1].row_stop == N_INDEX
    assert all(a.row_stop == b.row_start for a, b in itertools.pairwise(shards))
    assert len(plan_shards(features.index.path, 100)) == N_INDEX // GROUP  # never empty
    with pytest.raises(ImageSearchError, match=r"shards = 0; it must be a whole number >= 1"):
        plan_shards(features.index.path, 0)


def result(dist: list[list[float]], ids: list[list[int]]) -> ShardResult:
    return ShardResult(
        distances=np.array(dist),
        ids=np.array(ids, dtype=np.int64),
        query_ids=np.arange(len(dist)),
        index_rows=0,
        index_bytes=0,
        query_block_bytes=0,
        seconds=0.0,
    )


def test_merge_breaks_ties_by_the_lower_image_id() -> None:
    """Equal distances across shards: the lower id first, whichever shard it came from."""
    a = result([[1.0, 2.0, 3.0], [0.5, 0.5, 9.0]], [[30, 40, 50], [70, 80, 90]])
    b = result([[2.0, 2.0, 4.0], [0.5, 1.0, 1.0]], [[10, 20, 60], [5, 6, 7]])
    dist, ids = merge_topk([a, b], 4)
    np.testing.assert_array_equal(ids, [[30, 10, 20, 40], [5, 70, 80, 6]])
    np.testing.assert_array_equal(dist, [[1.0, 2.0, 2.0, 2.0], [0.5, 0.5, 0.5, 1.0]])
    with pytest.raises(ValueError, match=r"n_index = 6, k = 7"):
        merge_topk([a, b], 7)


def test_sharded_in_process_equals_the_unsharded_kernel(
    features: Features, data: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    """Any cut of the index gives the same ids and the same float64 bits as one shard."""
    _, one_d, one_i = search_sharded_local(features.index.path, features.query.path, K, 1)
    for n in (3, 12):
        qids, dist, ids = search_sharded_local(features.index.path, features.query.path, K, n)
        np.testing.assert_array_equal(ids, one_i)
        assert dist.tobytes() == one_d.tobytes()
    full = data[2]
    expected = (first_k(full, K) * 7 + 1000).astype(np.int64)  # positions to image ids
    np.testing.assert_array_equal(one_i, expected)
    np.testing.assert_array_equal(qids, np.arange(N_QUERY) + 10**6)


# --- the cluster setting ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ClusterSetting("in-process")),
        pytest.param("", ClusterSetting("in-process"), id="empty"),
        (" none ", ClusterSetting("in-process")),
        ("local:2", ClusterSetting("local", workers=2)),
        ("tcp://scheduler:8786", ClusterSetting("address", address="tcp://scheduler:8786")),
        ("tcp://10.0.0.7:1", ClusterSetting("address", address="tcp://10.0.0.7:1")),
        ("kubernetes", ClusterSetting("kubernetes")),
    ],
)
def test_cluster_setting_parses(value: str | None, expected: ClusterSetting) -> None:
    assert parse_cluster(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("local:0", r"cluster = 'local:0': local:N needs a whole number of workers N from 1"),
        ("local:", r"cluster = 'local:': local:N needs a whole number"),
        ("local:two", r"cluster = 'local:two': local:N needs a whole number"),
        ("local:-1", r"cluster = 'local:-1': local:N needs"),
        ("local:999", r"cluster = 'local:999': local:N needs .* from 1 to 256"),
        ("tcp://", r"cluster = 'tcp://': a scheduler address is tcp://HOST:PORT"),
        ("tcp://scheduler", r"cluster = 'tcp://scheduler': a scheduler address is tcp://HOST"),
        ("tcp://:8786", r"cluster = 'tcp://:8786': a scheduler address"),
        ("tcp://host:70000", r"cluster = 'tcp://host:70000': .* port from 1 to 65535"),
        ("tcp://host:0", r"cluster = 'tcp://host:0': .* port from 1 to 65535"),
        ("kube", r"cluster = 'kube' is not a cluster; use none .* local:N .* tcp://HOST:PORT"),
        ("local", r"cluster = 'local' is not a cluster; use .* kubernetes"),
        ("http://scheduler:8786", r"cluster = 'http://scheduler:8786' is not a cluster"),
    ],
)
def test_bad_cluster_setting_names_the_value_and_the_forms(value: str, message: str) -> None:
    with pytest.raises(ImageSearchError, match=message) as raised:
        parse_cluster(value)
    assert "\n" not in str(raised.value)


def test_task_runner_for_each_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process needs no runner; local:N is a LocalCluster of N processes × 1 thread; an
    address attaches; kubernetes creates the operator's KubeCluster from the rendered spec."""
    from prefect_dask import DaskTaskRunner

    assert task_runner(None) is None
    local = task_runner("local:3")
    assert isinstance(local, DaskTaskRunner)
    assert local.cluster_class == "distributed.LocalCluster"
    assert local.cluster_kwargs == {
        "n_workers": 3,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": None,
    }
    assert task_runner("tcp://scheduler:8786").address == "tcp://scheduler:8786"
    monkeypatch.setenv("IMAGE_SEARCH_DASK_VARIABLES", '{"image": "reg/image-search:abc"}')
    kube = task_runner("kubernetes")
    assert kube.cluster_class == "dask_kubernetes.operator.KubeCluster"
    spec = kube.cluster_kwargs["custom_cluster_spec"]
    assert spec["kind"] == "DaskCluster" and kube.cluster_kwargs["namespace"] == "image-search"
    assert default_shards(parse_cluster("kubernetes")) == 2
    monkeypatch.setenv("IMAGE_SEARCH_DASK_VARIABLES", "{}")
    with pytest.raises(ImageSearchError, match=r"needs the flow-run image: set image in"):
        task_runner("kubernetes")
    monkeypatch.setenv("IMAGE_SEARCH_DASK_VARIABLES", '{"n_workers": 0, "image": "x"}')
    with pytest.raises(ImageSearchError, match=r"IMAGE_SEARCH_DASK_VARIABLES is not valid .*"):
        task_runner("kubernetes")


# --- a real LocalCluster ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_and_numpy(
    features: Features,
    dask_address: str,
    tmp_path_factory: pytest.TempPathFactory,
    prefect_harness: None,
) -> dict[str, Any]:
    """The sharded backend on the LocalCluster and the numpy backend in-process, same files."""
    out = tmp_path_factory.mktemp("run")
    run = RunFolder(out)
    sharded = search_features_sharded(features, run, K, dask_address)
    numpy_run = search_features(features, run, "numpy", K)
    return {"out": out, "sharded": sharded, "numpy": numpy_run}


def test_sharded_on_a_cluster_equals_the_numpy_backend_bit_for_bit(
    sharded_and_numpy: dict[str, Any], data: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    """(a) Same query ids, neighbour ids and distances to the last bit, and the tie rule of a
    stable sort on the float64 distances (identical rows planted at every k-th place)."""
    out = sharded_and_numpy["out"]
    s_q, s_d, s_i = load_neighbors(sharded_and_numpy["sharded"], out)
    n_q, n_d, n_i = load_neighbors(sharded_and_numpy["numpy"], out)
    np.testing.assert_array_equal(s_q, n_q)
    np.testing.assert_array_equal(s_i, n_i)
    assert s_d.dtype == n_d.dtype == np.float32 and s_d.tobytes() == n_d.tobytes()
    np.testing.assert_array_equal(s_i, first_k(data[2], K) * 7 + 1000)
    run = sharded_and_numpy["sharded"]
    assert (run.backend, run.available, run.n_queries, run.k) == ("sharded", True, N_QUERY, K)
    assert run.details["cluster"].startswith("tcp://127.0.0.1:")


def test_each_worker_holds_only_its_shard(sharded_and_numpy: dict[str, Any]) -> None:
    """(d) Two shards (one per worker thread), each loading its own rows, never the index."""
    shards = sharded_and_numpy["sharded"].details["shards"]
    assert len(shards) == 2
    assert sum(s["rows"] for s in shards) == N_INDEX
    for s in shards:
        assert s["rows"] < N_INDEX
        assert s["index_bytes"] == s["rows"] * (DIM * 4 + 8)
        assert s["query_block_bytes"] == (N_QUERY // 2) * (DIM * 4 + 8)


def test_traced_peak_of_a_shard_task_is_its_shard_plus_one_query_block(
    features: Features, dask_address: str
) -> None:
    """(d) Measured on a worker: the peak of NumPy allocations in the shard task stays below
    its shard + one query block + that block's scores and top-k scratch (a whole index would
    not fit under it)."""
    from distributed import Client

    shard = plan_shards(features.index.path, 2)[1]
    with Client(dask_address) as client:
        worker = sorted(client.nthreads())[0]
        # Once untraced first: the worker's first task imports modules (transient allocations).
        runs = [
            client.submit(
                search_shard,
                shard,
                str(features.query.path),
                K,
                threads=1,  # as on a worker of one thread
                trace_memory=trace,
                pure=False,
                workers=[worker],
            ).result()
            for trace in (False, True)
        ]
    got = runs[1]
    assert got.index_rows == shard.rows == 1500
    block = (N_QUERY // 2) * (DIM * 4 + 8)
    scores = (N_QUERY // 2) * shard.rows * 4
    measure = 128 * DIM * (4 + 8)  # one slice of candidates gathered, re-measured in float64
    # + 4 MiB: outputs, small arrays and the worker's own traffic while the task runs.
    limit = got.index_bytes + block + scores + measure + 4 * 2**20
    assert got.peak_traced_bytes is not None
    assert got.index_bytes <= got.peak_traced_bytes <= limit
    assert limit < N_INDEX * DIM * 4  # the bound is tighter than holding the whole index


def test_rerun_with_the_same_inputs_reuses_the_stage(
    sharded_and_numpy: dict[str, Any], features: Features
) -> None:
    """Same inputs, another cluster setting: the recorded answer is reused, not recomputed."""
    again = search_features_sharded(features, RunFolder(sharded_and_numpy["out"]), K, None)
    assert again.search_seconds == sharded_and_numpy["sharded"].search_seconds


def test_bad_cluster_stops_before_anything_runs(features: Features, tmp_path: Path) -> None:
    with pytest.raises(ImageSearchError, match=r"cluster = 'local:x'"):
        search_features_sharded(features, RunFolder(tmp_path), K, "local:x")
    assert not (tmp_path / ".staging").exists()


def test_a_scheduler_nothing_answers_on_is_refused_at_once() -> None:
    """A closed port is named with the setting and the fix before any work, not after Dask's
    30 s connect timeout."""
    import socket
    import time

    from flows.sharded import embed_runner

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ImageSearchError) as info:
        embed_runner(f"tcp://127.0.0.1:{port}")
    assert time.monotonic() - started < 20  # Dask itself gave up after 30 s, then an OSError
    text = info.value.worded(option_name)
    assert f"Cannot reach the Dask scheduler at tcp://127.0.0.1:{port}" in text
    assert "--cluster to local:N" in text


def test_the_dask_deployment_renders_its_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """prefect.yaml's gpu-dask: valid flow parameters with cluster = kubernetes, and the env it
    hands the flow run renders a DaskCluster of 2 GPU workers running the deployment's image."""
    from flows.params import SearchParams
    from tests.deploy.helpers import deployment_config

    config = deployment_config("gpu-dask")
    params = SearchParams(**config["parameters"])
    assert params.cluster == "kubernetes" and params.out.startswith("/shared/")
    env = config["work_pool"]["job_variables"]["env"]
    raw = env["IMAGE_SEARCH_DASK_VARIABLES"].replace("{{ build-image.image }}", "reg/is:abc")
    monkeypatch.setenv("IMAGE_SEARCH_DASK_VARIABLES", raw)
    spec = task_runner("kubernetes").cluster_kwargs["custom_cluster_spec"]
    worker = spec["spec"]["worker"]
    assert worker["replicas"] == 2
    assert worker["spec"]["containers"][0]["image"] == "reg/is:abc"
    assert worker["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
