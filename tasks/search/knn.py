"""The search stage: run one backend over the feature files (unless it already ran on the same
inputs) and keep its neighbours, as image ids, in ``.knn/<backend>.npz`` in the output folder.

In a collection the queries are index images: each is searched for ``k + 1`` neighbours and left
out of its own answer (leave-one-out, :func:`leave_one_out`).
"""

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
from tasks.storage import RunFolder, atomic_path
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


def leave_one_out(
    query_ids: np.ndarray, distances: np.ndarray, neighbor_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` nearest *other* images, from its ``k + 1`` nearest of an index that
    holds it.

    query_ids (n,); distances, neighbor_ids (n, k + 1), nearest first. The query's own id is
    dropped; where it is not among the k + 1 (more than k exact copies sorted before it), every
    one of them is at its distance, and the last is dropped instead.
    Returns (distances, neighbor_ids), each of shape (n, k).
    """
    n, k1 = neighbor_ids.shape
    if k1 < 2:
        raise ValueError(f"Expected k + 1 >= 2 neighbours per query, but got {k1}")
    is_self = neighbor_ids == np.asarray(query_ids)[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k1 - 1)
    keep = np.ones((n, k1), dtype=bool)
    keep[np.arange(n), drop] = False
    return distances[keep].reshape(n, k1 - 1), neighbor_ids[keep].reshape(n, k1 - 1)


def _drop_self(path: Path) -> None:
    """Rewrite a backend's ``.npz`` of k + 1 neighbours as the leave-one-out k (atomically)."""
    with np.load(path) as z:
        qids, dist, nids = z["query_ids"], z["distances"], z["neighbor_ids"]
    dist, nids = leave_one_out(qids, dist, nids)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, query_ids=qids, distances=dist, neighbor_ids=nids)


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
    exclude_self: bool = False,
) -> SearchRun:
    """Run one backend over the feature files unless it already ran on the same inputs (then
    its library is not even imported).

    ``searcher``: how to search when the backend is not one of this process (its answer must
    not depend on where it runs: the key holds the backend's name and ``code``, not its place).
    ``exclude_self``: the queries are index images; each is left out of its own answer.
    """
    layout = knn_stage(backend_name)
    (rel,) = layout.outputs
    stage = run.stage(
        layout,
        [features.index.fingerprint, features.query.fingerprint, backend_name, k, exclude_self],
        code=[*code, __name__],
    )
    done = stage.done()
    if done is not None:
        result = SearchRun.model_validate(done["run"])
    else:
        if searcher is None:  # asked only now: asking imports the backend's library (seconds)
            backend = make_backend(backend_name)
            reason = backend.unavailable_reason()
            if reason is not None:
                return SearchRun(
                    backend=backend.name, device=backend.device, available=False, reason=reason
                )
            searcher = partial(run_backend, backend)
        dest = stage.path(rel)
        result = searcher(features.index.path, features.query.path, k + exclude_self, dest)
        update: dict[str, object] = {"path": rel}
        if exclude_self:
            _drop_self(dest)
            update.update(k=k, details={**result.details, "leave_one_out": True})
        result = result.model_copy(update=update)
        stage.finish(run=result.model_dump())
    # Read from where this run's copy is (staged until the run commits its outputs).
    return result.model_copy(update={"path": str(stage.path(rel).relative_to(run.out))})


@task(cache_policy=NO_CACHE)
def knn(features: Features, out: str, backend: str, k: int, exclude_self: bool) -> SearchRun:
    """Prefect task: one backend's exact search; an unavailable backend is reported, not fatal."""
    run = search_features(features, RunFolder(Path(out)), backend, k, exclude_self=exclude_self)
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
