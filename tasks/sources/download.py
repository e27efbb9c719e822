"""The download task: STL-10 fetched and verified with Prefect's retries, the one retry layer.

One attempt per try (:func:`tasks.sources.resolve.download_and_extract`, whose ``.part`` file
resumes), retried with exponential backoff for :class:`TransientNetworkError` only; a bad URL,
checksum or tarball, or a bug, fails at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import State
from prefect.tasks import exponential_backoff

from tasks.errors import ImageSearchError, TransientNetworkError
from tasks.sources import resolve
from tasks.types import DataRef

BACKOFF_ENV = "IMAGE_SEARCH_RETRY_BACKOFF"
RETRIES = 5


def retry_backoff() -> float:
    """Base delay in seconds between download retries: ``$IMAGE_SEARCH_RETRY_BACKOFF``, else 2.

    Read when a flow runs, not at import, so tests and users set it per run.
    """
    try:
        return max(float(os.environ.get(BACKOFF_ENV, "2")), 0.0)
    except ValueError:
        return 2.0


def is_transient(task: Any, task_run: Any, state: State) -> bool:
    """Retry only network trouble; a bad URL, checksum, tarball or a bug fails at once."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, TransientNetworkError)


@task(retries=RETRIES, retry_condition_fn=is_transient, cache_policy=NO_CACHE)
def download(source: str, data_dir: str | None) -> DataRef:
    """Prefect task: fetch and verify the dataset, one attempt per try."""
    ref = resolve.download_and_extract(source, Path(data_dir) if data_dir else None)
    get_run_logger().info("dataset %s: %d images (%s)", ref.uri, ref.rows, ref.fingerprint)
    return ref


def download_task() -> Task[..., DataRef]:
    """The download task with this run's backoff: base, 2×, 4×, ... seconds between tries."""
    delays = exponential_backoff(backoff_factor=retry_backoff())(RETRIES)
    return download.with_options(retry_delay_seconds=delays)


def fetch_with_retries(source: str, data_dir: str | None) -> DataRef:
    """STL-10 through the download task (the registry's ``fetch`` in a flow); still failing
    after the last try, it is the user's to see."""
    try:
        return download_task()(source, data_dir)
    except TransientNetworkError as exc:
        raise ImageSearchError(f"{exc.args[0]} Gave up after {RETRIES + 1} attempts.") from exc
