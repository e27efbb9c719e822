"""Which Prefect API a ``run`` reports to: the one in ``PREFECT_API_URL``, checked first; else the
local API that commands share (:mod:`flows.local_api`), found running or started in the
background while the flow's modules load. At the end the run's last logs and events reach it."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flows.cli.signals import note
from flows.local_api import LocalApi, Server, check_api, idle_minutes, prefect_home, startup_timeout

log = logging.getLogger(__name__)

Ready = Callable[[], None]
"""Blocks until the API answers and points this process's Prefect clients at it."""


def _minutes(value: float) -> str:
    return f"{value:g} minute" + ("" if value == 1 else "s")


def announce(server: Server) -> None:
    """Tell the user about the local API this run reports to: where it is, that it outlives
    the command, and how it stops."""
    lasts = (
        f"it stops after {_minutes(server.idle_minutes)} unused, and {server.stop_hint}"
        if server.idle_minutes is not None
        else server.stop_hint
    )
    if server.started_here:
        note(
            f"started a local Prefect API for this and later commands at {server.ui} (its UI "
            f"keeps this run's page); {lasts}."
        )
    else:
        note(f"using the local Prefect API at {server.ui}; {lasts}.")


@contextmanager
def prefect_api() -> Iterator[Ready]:
    """The configured Prefect API, checked; else the shared local one (found, or started now).

    Yields ``ready``, to call once the flow's modules are imported. Holds the local API's
    lease until the end, when the run's last logs and events are sent.
    """
    from prefect.settings import PREFECT_API_URL

    configured = PREFECT_API_URL.value()
    if configured:
        check_api(configured)
        yield lambda: None
        return
    local = LocalApi(prefect_home(), startup_timeout(), idle_minutes())
    with local.lease():
        found = local.find_or_start()
        if found is None:
            note("starting a local Prefect API (a first one also creates its database)")

        answered: list[Server] = [found] if found is not None else []

        def ready() -> None:
            server = found or local.wait_ready()
            answered.append(server)
            announce(server)
            use_api(server.url)

        try:
            yield ready
        finally:
            if not answered:  # stopped before the server it started answered: nobody used it
                local.stop_started()
            drain_to_api()
            use_api(None)


def use_api(url: str | None) -> None:
    """Point every Prefect client of this process at ``url`` (None: back to unset)."""
    from prefect.context import refresh_global_settings_context

    if url is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = url
    refresh_global_settings_context()


def drain_to_api(timeout: float = 10.0) -> None:
    """Send the logs and events still queued, so the run's record is complete."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout, at_exit=False)
        except Exception:  # a worker that never started, or a server already gone
            log.debug("draining %s failed", worker, exc_info=True)
