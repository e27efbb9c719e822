"""What the service answers from: the loaded index and its model behind one reference, swapped
whole when a run commits a new index into the folder, and one thread that embeds and searches
the queries of concurrent requests together.

A request takes the current :class:`Loaded` once and keeps it to the end, so a swap never mixes
two indexes in one answer and requests in flight finish on the index they started with. The new
index is read completely (and checked to be one committed set) before the swap; until then, and
whenever loading fails, the last good one keeps answering. Its tiers travel with it: the int8
copy that exact answers scan and the approximate index with its recall are files of the same
committed set, opened with it and swapped with it (for the moment of the swap both sets are in
memory: 2 x 2 GiB of int8 copy at 10^6 images).

Each query says whether it must be exact; the batcher searches the queries of one index and one
choice together, and each result carries the tier it came from.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.ask import (
    Forward,
    Index,
    Neighbour,
    Tier,
    index_identity,
    load_forward,
    model_spec,
    open_index,
    search,
    tier,
)
from tasks.errors import ImageSearchError
from tasks.types import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    """An index together with the forward pass that embeds queries the way it was built."""

    index: Index
    spec: ModelSpec
    forward: Forward


Build = Callable[[ModelSpec, Path | None], Forward]
"""Makes the forward pass of a model spec, given the index's exported model (or None)."""


def load(
    folder: Path,
    weights: str | None,
    previous: Loaded | None = None,
    build: Build = load_forward,
) -> Loaded:
    """Open the index in ``folder`` and check its model; the model of ``previous`` is kept when
    the index was built with the same one (same key), else ``build`` makes a new one."""
    index = open_index(folder)
    spec = model_spec(index.meta, weights)
    if previous is not None and previous.index.model_key == index.model_key:
        return Loaded(index, spec, previous.forward)
    forward = build(spec, index.model_file)
    size = spec.input_size
    forward(np.zeros((1, size, size, 3), dtype=np.uint8))  # trace now, not on the first request
    return Loaded(index, spec, forward)


@dataclass(frozen=True)
class Result:
    """Neighbours of one query, the tier they came from, and what the batch it was part of
    cost."""

    neighbours: list[Neighbour]
    tier: Tier
    batch: int
    embed_ms: float
    search_ms: float


@dataclass
class _Job:
    loaded: Loaded
    pixels: np.ndarray  # (S, S, 3) uint8 at the index's input size
    k: int
    exact: bool = False
    future: Future[Result] = field(default_factory=Future)


def tiers(index: Index) -> dict[str, Any]:
    """What each tier of ``index`` answers with, and the derived files passed over and why."""
    exact = tier(index, exact=True)
    approximate = tier(index)
    return {
        "exact": exact.method,
        "approximate": approximate.as_dict() if approximate.name == "approximate" else None,
        "certified": index.stats.as_dict() if index.certified is not None else None,
        "passed_over": dict(index.passed_over),
    }


class Engine:
    """The loaded index and model, a watcher that swaps in a newly committed index, and a
    batcher that runs the forward pass and the search for up to ``max_batch`` queries at once."""

    def __init__(
        self,
        folder: str | Path,
        *,
        weights: str | None = None,
        reload_interval: float = 2.0,
        max_batch: int = 8,
        build: Build = load_forward,
    ) -> None:
        self.folder = Path(folder).expanduser().resolve()
        self.weights = weights
        self.reload_interval = reload_interval
        self.max_batch = max_batch
        self.build = build
        self._loaded = load(self.folder, weights, None, build)
        self.reloads = 0
        self.last_error: str | None = None
        self._failed_identity: str | None = None
        self._swap_lock = threading.Lock()
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def loaded(self) -> Loaded:
        """The index and model to answer the next request with (one reference, read once)."""
        return self._loaded

    def start(self) -> None:
        """Start the batcher and the watcher threads."""
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._batch_loop, name="search-batcher", daemon=True),
            threading.Thread(target=self._watch_loop, name="index-watcher", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop both threads; queued queries are answered first."""
        self._stop.set()
        self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads = []

    def refresh(self) -> bool:
        """Swap in the index committed to the folder since the last load, if any; True when
        swapped. A folder that vanished or an index that does not load leaves the current one
        answering, with the reason in :attr:`last_error`."""
        with self._swap_lock:
            current = self._loaded
            identity = index_identity(self.folder)
            if identity is None:
                self.last_error = (
                    f"the index folder {self.folder.name} holds no index now; answering from "
                    f"the one loaded at "
                    f"{time.strftime('%H:%M:%S', time.localtime(current.index.loaded_at))}"
                )
                return False
            if identity == current.index.identity:
                self.last_error = None
                return False
            if identity == self._failed_identity:
                return False  # the same files failed before: wait for the next commit
            try:
                new = load(self.folder, self.weights, current, self.build)
            except ImageSearchError as exc:
                self._failed_identity = identity
                log.warning("the updated index was not loaded: %s", exc)
                # Said without the server's paths: /healthz answers anyone who asks.
                reason = str(exc).replace(str(self.folder), self.folder.name)
                self.last_error = f"the updated index was not loaded: {reason}"
                return False
            self._loaded = new  # the swap: one reference
            self.reloads += 1
            self.last_error = None
            self._failed_identity = None
            log.info("loaded the updated index of %s: %d images", self.folder, len(new.index))
            return True

    def _watch_loop(self) -> None:
        while not self._stop.wait(self.reload_interval):
            try:
                self.refresh()
            except Exception:  # never let the watcher die: the next interval tries again
                log.exception("checking %s for an updated index failed", self.folder)

    def submit(
        self, loaded: Loaded, pixels: np.ndarray, k: int, exact: bool = False
    ) -> Future[Result]:
        """Queue one query (pixels (S, S, 3) uint8 at ``loaded``'s input size) for the batcher;
        ``exact``: never from the approximate index. Cancelling the future before its batch
        starts drops the query."""
        job = _Job(loaded, pixels, k, exact)
        self._jobs.put(job)
        return job.future

    def _batch_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            jobs = [job]
            stopping = False
            while len(jobs) < self.max_batch:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                jobs.append(more)
            # A query whose request was abandoned (its client went away) is dropped here.
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            groups: dict[tuple[int, bool], list[_Job]] = {}
            for j in jobs:  # one index and model per forward pass, one tier per search
                groups.setdefault((id(j.loaded), j.exact), []).append(j)
            for group in groups.values():
                self._run(group)
            if stopping:
                return

    @staticmethod
    def _run(jobs: list[_Job]) -> None:
        loaded = jobs[0].loaded
        try:
            started = time.perf_counter()
            embeddings = loaded.forward(np.stack([j.pixels for j in jobs]))
            embedded = time.perf_counter()
            answers = search(loaded.index, embeddings, max(j.k for j in jobs), exact=jobs[0].exact)
            done = time.perf_counter()
        except BaseException as exc:  # the requests waiting on this batch get the error
            for j in jobs:
                j.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for j, (neighbours, how) in zip(jobs, answers, strict=True):
            j.future.set_result(
                Result(
                    neighbours=neighbours[: j.k],
                    tier=how,
                    batch=len(jobs),
                    embed_ms=(embedded - started) * 1e3,
                    search_ms=(done - embedded) * 1e3,
                )
            )

    def health(self) -> dict[str, Any]:
        """What /healthz reports: the index answering now, its model, reloads and trouble."""
        loaded = self._loaded
        index = loaded.index
        return {
            "status": "ok" if self.last_error is None else "degraded",
            "index": index.folder.name,  # no server path: /healthz answers anyone
            "images": len(index),
            "model_key": index.model_key,
            "weights": loaded.spec.weights,
            "input_size": index.input_size,
            "features_from": index.features_from,
            "tiers": tiers(index),
            "loaded_at": index.loaded_at,
            "identity": index.identity,
            "reloads": self.reloads,
            "queued": self._jobs.qsize(),
            "problem": self.last_error,
        }
