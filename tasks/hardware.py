"""What this machine offers, read at run time: cores this process may use."""

from __future__ import annotations

import os


def cpu_count() -> int:
    """Cores this process may run on (respects affinity masks and container limits)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
