"""The ``cluster`` setting, parsed without importing Prefect or Dask, so that checking a
command line's options stays cheap and happens before Prefect configures its logging."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from tasks.errors import ImageSearchError, param

ACCEPTED = (
    "none (in this process), local:N (N worker processes here), tcp://HOST:PORT (a running "
    "Dask scheduler) or kubernetes (worker pods through the Dask operator)"
)
_TCP = re.compile(r"tcp://(?P<host>[A-Za-z0-9.\-_]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})")
MAX_LOCAL_WORKERS = 256


@dataclass(frozen=True)
class ClusterSetting:
    """A parsed ``cluster`` setting."""

    kind: Literal["in-process", "local", "address", "kubernetes"]
    workers: int | None = None
    address: str | None = None

    def describe(self) -> str:
        if self.kind == "local":
            return f"local:{self.workers}"
        if self.kind == "address":
            return str(self.address)
        return self.kind


def parse_cluster(value: str | None) -> ClusterSetting:
    """The setting for ``value``; anything else is a one-line error naming it and the forms."""
    if value is None or value.strip() in ("", "none"):
        return ClusterSetting("in-process")
    text = value.strip()
    if text == "kubernetes":
        return ClusterSetting("kubernetes")
    if text.startswith("local:"):
        count = text.removeprefix("local:")
        if not count.isdigit() or not 1 <= int(count) <= MAX_LOCAL_WORKERS:
            raise ImageSearchError(
                f"{param('cluster')} = {value!r}: local:N needs a whole number of workers N from "
                f"1 to {MAX_LOCAL_WORKERS}, e.g. local:2."
            )
        return ClusterSetting("local", workers=int(count))
    if text.startswith("tcp://"):
        found = _TCP.fullmatch(text)
        if found is None or not 1 <= int(found.group("port")) <= 65535:
            raise ImageSearchError(
                f"{param('cluster')} = {value!r}: a scheduler address is tcp://HOST:PORT with a "
                f"port from 1 to 65535, e.g. tcp://scheduler:8786."
            )
        return ClusterSetting("address", address=text)
    raise ImageSearchError(f"{param('cluster')} = {value!r} is not a cluster; use {ACCEPTED}.")
