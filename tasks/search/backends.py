"""Exact k-nearest-neighbour search behind one small interface, on GPU (cuML) and CPU
(scikit-learn, FAISS, NumPy), all answering in true Euclidean distance, and the honest clock
that runs one of them over two feature files (no Prefect here: benchmarks time this too).

Every backend is imported lazily: a missing package or CUDA device makes the backend
*unavailable with a reason*, and the run goes on with the others.
"""

from __future__ import annotations

import importlib
import time
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel

from tasks.errors import ImageSearchError
from tasks.features.store import load_features
from tasks.hardware import cpu_count
from tasks.search.exact import prepare_index, search_prepared
from tasks.search.k import check_k
from tasks.storage import atomic_path

REFERENCE = "sklearn"
SKLEARN_WORKING_MEMORY_MIB = 256
# The backends a run may ask for; the parameter model and the CLI read this one list.
BackendName = Literal["cuml", "sklearn", "faiss", "numpy", "certified"]
BACKEND_NAMES: tuple[str, ...] = typing.get_args(BackendName)


def to_euclidean(squared: Any) -> Any:
    """True Euclidean distances from squared L2 ones (FAISS, cuML 'sqeuclidean').

    Tiny negative values from float32 cancellation are clamped to zero before the root.
    Works on NumPy and CuPy arrays alike.
    """
    return (squared.clip(0) ** 0.5).astype("float32")


class Backend(ABC):
    """Fit on the index, search the queries; distances are true Euclidean."""

    name: str
    device: str = "cpu"

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run here, or None."""
        return None

    def load(self, path: Path) -> tuple[np.ndarray, Any]:
        """Read a feature file: (ids on the host, embeddings where this backend wants them)."""
        return load_features(path)

    @abstractmethod
    def fit(self, index: Any) -> None:
        """Prepare the index of shape (n_index, d)."""

    @abstractmethod
    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (distances (n_queries, k) float32, positions (n_queries, k) int64) on the host."""

    def sync(self) -> None:  # noqa: B027 - a no-op for host backends, by design
        """Wait for queued device work, so clocks read after it measure it."""

    def details(self) -> dict[str, Any]:
        """What this backend chose at run time and how it went (recorded in compare.json)."""
        return {}

    def threads(self) -> dict[str, int]:
        """Threads each native library of this backend is set to use."""
        from threadpoolctl import threadpool_info

        info: dict[str, int] = {}
        for pool in threadpool_info():
            info[str(pool.get("internal_api"))] = int(pool.get("num_threads", 0))
        return info


class SklearnBackend(Backend):
    """scikit-learn brute force with all cores: the CPU reference."""

    name = "sklearn"

    def fit(self, index: np.ndarray) -> None:
        from sklearn.neighbors import NearestNeighbors

        self._index_size = len(index)
        self._nn = NearestNeighbors(algorithm="brute", n_jobs=-1).fit(index)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from sklearn import config_context

        # scikit-learn's default 1 GiB of scratch per chunk would dominate the flow's memory.
        with config_context(working_memory=SKLEARN_WORKING_MEMORY_MIB):
            dist, pos = self._nn.kneighbors(queries, n_neighbors=k)
        return dist.astype(np.float32), pos.astype(np.int64)


def _import_faiss() -> Any:
    """Import FAISS only after scikit-learn's native libraries are loaded.

    Loaded the other way round, the two OpenMP/BLAS stacks starve each other on a small
    machine: scikit-learn's brute force then ran 4x slower using 0.3 of 2 cores.
    """
    importlib.import_module("sklearn.neighbors")
    return importlib.import_module("faiss")


class FaissBackend(Backend):
    """FAISS exact ``IndexFlatL2``; it returns squared distances, converted here."""

    name = "faiss"

    def unavailable_reason(self) -> str | None:
        try:
            _import_faiss()
        except ImportError as exc:
            return f"faiss is not installed ({exc}); pip install faiss-cpu"
        return None

    def fit(self, index: np.ndarray) -> None:
        faiss = _import_faiss()

        faiss.omp_set_num_threads(cpu_count())
        self._index = faiss.IndexFlatL2(index.shape[1])
        self._index.add(np.ascontiguousarray(index, dtype=np.float32))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sq, pos = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return to_euclidean(sq), pos.astype(np.int64)

    def threads(self) -> dict[str, int]:
        faiss = _import_faiss()
        return {**super().threads(), "faiss_omp": int(faiss.omp_get_max_threads())}


class NumpyBackend(Backend):
    """Blocked float32 GEMM with a cheap top-k: exact search near the CPU's GEMM ceiling."""

    name = "numpy"

    def fit(self, index: np.ndarray) -> None:
        self._prepared = prepare_index(index)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        dist, pos = search_prepared(self._prepared, queries, k)
        return dist.astype(np.float32), pos.astype(np.int64)


class CertifiedBackend(Backend):
    """Exact search at reduced-precision speed: a reduced-precision candidate pass, an exact
    float64 re-rank and a per-query proof that no other row can be among the k nearest (queries
    whose proof fails take the exact path). The format is chosen at run time by measurement."""

    name = "certified"

    def fit(self, index: np.ndarray) -> None:
        from tasks.search.certified import CertifiedStats, prepare_certified

        self._prepared = prepare_certified(index)
        self._stats = CertifiedStats()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from tasks.search.certified import CertifiedStats, search_certified

        self._stats = CertifiedStats()  # the timed search's own counts, not the warm-up's
        dist, pos = search_certified(self._prepared, queries, k, stats=self._stats)
        return np.asarray(dist, dtype=np.float32), np.asarray(pos, dtype=np.int64)

    def details(self) -> dict[str, Any]:
        choice = self._prepared.choice
        return {
            "format": choice.fmt,
            "engine": choice.engine,
            "why": choice.reason,
            "cpu": {flag: on for flag, on in choice.cpu.items() if on},
            **self._stats.as_dict(),
        }


class CumlBackend(Backend):
    """cuML brute force on the GPU; features go from Parquet to the device through cuDF."""

    name = "cuml"
    device = "gpu"

    def unavailable_reason(self) -> str | None:
        try:
            import cupy
        except ImportError as exc:
            return f"CuPy is not installed ({exc}); pip install 'image-search[gpu]'"
        try:
            n = int(cupy.cuda.runtime.getDeviceCount())
        except Exception as exc:  # CUDARuntimeError has no stable import path across versions
            return f"no CUDA device available ({exc})"
        if n == 0:
            return "no CUDA device available"
        try:
            import cudf  # noqa: F401
            import cuml  # noqa: F401
        except ImportError as exc:
            return f"cuDF/cuML are not installed ({exc}); pip install 'image-search[gpu]'"
        return None

    def load(self, path: Path) -> tuple[np.ndarray, Any]:
        import cudf

        df = cudf.read_parquet(str(path), columns=["image_id", "embedding"])
        ids = df["image_id"].to_numpy()
        leaves = df["embedding"].list.leaves.values  # a CuPy view of the float32 values
        return ids, leaves.reshape(len(df), -1)

    def fit(self, index: Any) -> None:
        from cuml.neighbors import NearestNeighbors

        self._nn = NearestNeighbors(algorithm="brute", metric="sqeuclidean", output_type="cupy")
        self._nn.fit(index)

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        import cupy

        sq, pos = self._nn.kneighbors(queries, n_neighbors=k)
        return cupy.asnumpy(to_euclidean(sq)), cupy.asnumpy(pos).astype(np.int64)

    def sync(self) -> None:
        import cupy

        cupy.cuda.Device().synchronize()

    def threads(self) -> dict[str, int]:
        return {}


BACKENDS: dict[str, Callable[[], Backend]] = {
    "sklearn": SklearnBackend,
    "faiss": FaissBackend,
    "numpy": NumpyBackend,
    "cuml": CumlBackend,
    "certified": CertifiedBackend,
}


def make_backend(name: str) -> Backend:
    """The backend called ``name``; an unknown name is a clear error listing the known ones."""
    try:
        return BACKENDS[name]()
    except KeyError:
        raise ImageSearchError(
            f"Unknown backend {name!r}; choose from {', '.join(sorted(BACKENDS))}."
        ) from None


def choose_backends(requested: Sequence[str] | None) -> list[str]:
    """The backends to run: sklearn (the reference) first, then the requested ones.

    Nothing requested: cuML where it can run; otherwise cuML is listed (so the run says why it
    is unavailable) and FAISS stands in for it.
    """
    if requested:
        for name in requested:
            make_backend(name)
        chosen = list(requested)
    else:
        chosen = ["cuml"] if CumlBackend().unavailable_reason() is None else ["cuml", "faiss"]
    return [REFERENCE, *[b for b in chosen if b != REFERENCE]]


class SearchRun(BaseModel):
    """What one backend did: timings, threads and where its neighbours are stored.

    ``path`` is relative to the output folder, so a copied or moved folder reads its own.
    """

    backend: str
    device: str
    available: bool
    reason: str | None = None
    path: str | None = None
    n_queries: int = 0
    k: int = 0
    load_seconds: float = 0.0
    fit_seconds: float = 0.0
    search_seconds: float = 0.0
    cores_used: float | None = None
    threads: dict[str, int] = {}
    details: dict[str, Any] = {}


def run_backend(
    backend: Backend, index_path: Path, query_path: Path, k: int, dest: Path
) -> SearchRun:
    """Load, warm up, then time fit and search separately; save neighbours to ``dest`` (.npz).

    The saved neighbours are image ids, not row positions. Each CPU backend runs with all the
    cores this process may use; ``cores_used`` is CPU time over wall time during the search.
    """
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    index_ids, index = backend.load(index_path)
    query_ids, queries = backend.load(query_path)
    backend.sync()
    load_s = time.perf_counter() - t0
    check_k(k, len(index_ids))
    with threadpool_limits(limits=cpu_count()):
        warm = min(len(index_ids), max(k, 256))
        backend.fit(index[:warm])
        backend.search(queries[: min(len(query_ids), 16)], min(k, warm))
        backend.sync()
        t0 = time.perf_counter()
        backend.fit(index)
        backend.sync()
        fit_s = time.perf_counter() - t0
        c0, t0 = time.process_time(), time.perf_counter()
        dist, pos = backend.search(queries, k)
        backend.sync()
        search_s = time.perf_counter() - t0
        cpu_s = time.process_time() - c0
        threads = backend.threads()
        details = backend.details()
    neighbor_ids = index_ids[pos]
    with atomic_path(dest) as tmp, open(tmp, "wb") as f:
        np.savez(f, query_ids=query_ids, distances=dist, neighbor_ids=neighbor_ids)
    return SearchRun(
        backend=backend.name,
        device=backend.device,
        available=True,
        path=str(dest),
        n_queries=len(query_ids),
        k=k,
        load_seconds=load_s,
        fit_seconds=fit_s,
        search_seconds=search_s,
        cores_used=round(cpu_s / search_s, 2) if backend.device == "cpu" and search_s > 0 else None,
        threads=threads,
        details=details,
    )
