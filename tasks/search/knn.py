"""The search stage: run one backend over the feature files (unless it already ran on the same
inputs) and keep its neighbours, as image ids, in ``.knn/<backend>.npz`` in the output folder."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.errors import ImageSearchError
from tasks.hardware import cpu_count
from tasks.layout import knn_stage
from tasks.search.backends import SearchRun, make_backend, run_backend
from tasks.storage import RunFolder
from tasks.types import Features


def load_neighbors(run: SearchRun, out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query_ids (n,), distances (n, k) float32, neighbor_ids (n, k) int64) of a finished run.

    ``out`` is the output folder that ``run.path`` is relative to.
    """
    if run.path is None:
        raise ValueError(f"backend {run.backend} did not run: {run.reason}")
    path = out / run.path
    try:
        with np.load(path) as z:
            return z["query_ids"], z["distances"], z["neighbor_ids"]
    except (OSError, ValueError, KeyError) as exc:
        raise ImageSearchError(
            f"Cannot read the neighbours of {run.backend} in {path} ({exc}); run again."
        ) from exc


# How a backend that is not a :class:`~tasks.search.backends.Backend` of this process searches
# (the sharded one, on a Dask cluster): (index file, query file, k, destination) -> its run.
Searcher = Callable[[Path, Path, int, Path], SearchRun]


def search_features(
    features: Features,
    run: RunFolder,
    backend_name: str,
    k: int,
    searcher: Searcher | None = None,
    code: Sequence[str] = ("tasks.search",),
) -> SearchRun:
    """Run one backend over the feature files unless it already ran on the same inputs.

    ``searcher``: how to search when the backend is not one of this process (its answer must
    not depend on where it runs: the key holds the backend's name and ``code``, not its place).
    """
    if searcher is None:
        backend = make_backend(backend_name)
        reason = backend.unavailable_reason()
        if reason is not None:
            return SearchRun(
                backend=backend.name, device=backend.device, available=False, reason=reason
            )
        searcher = partial(run_backend, backend)
    layout = knn_stage(backend_name)
    (rel,) = layout.outputs
    stage = run.stage(
        layout,
        [features.index.fingerprint, features.query.fingerprint, backend_name, k],
        code=code,
    )
    done = stage.done()
    if done is not None:
        result = SearchRun.model_validate(done["run"])
    else:
        result = searcher(features.index.path, features.query.path, k, stage.path(rel))
        result = result.model_copy(update={"path": rel})
        stage.finish(run=result.model_dump())
    # Read from where this run's copy is (staged until the run commits its outputs).
    return result.model_copy(update={"path": str(stage.path(rel).relative_to(run.out))})


@task(cache_policy=NO_CACHE)
def knn(features: Features, out: str, backend: str, k: int) -> SearchRun:
    """Prefect task: one backend's exact search; an unavailable backend is reported, not fatal."""
    run = search_features(features, RunFolder(Path(out)), backend, k)
    logger = get_run_logger()
    if run.available and run.cores_used is not None and run.cores_used < 0.5 * cpu_count():
        logger.warning(
            "%s used only %.2f of %d cores during its search: another library may be throttling "
            "its threads, so its time is not representative.",
            backend,
            run.cores_used,
            cpu_count(),
        )
    if run.available:
        logger.info(
            "%s: fit %.4f s, search %.4f s, %s cores",
            backend,
            run.fit_seconds,
            run.search_seconds,
            run.cores_used,
        )
    else:
        logger.warning("backend %s unavailable: %s", backend, run.reason)
    return run
