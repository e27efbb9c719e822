"""What a command sets up in its process before the work imports anything heavy: where log lines
go, and how much TensorFlow says while it starts."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import tasks
from flows.cli.signals import PROG
from tasks.features.model import VERBOSE_SETTING

EXTRA_LOGGERS = "PREFECT_LOGGING_EXTRA_LOGGERS"
TF_LOG_LEVEL = "TF_CPP_MIN_LOG_LEVEL"


@contextmanager
def command_environment(verbose: bool) -> Iterator[None]:
    """Before Prefect is imported: ship the pure functions' log lines (``tasks.*``) to the API
    with Prefect's own; TensorFlow's C++ start-up lines only with ``--verbose``. Restored after."""
    names = (EXTRA_LOGGERS, TF_LOG_LEVEL, VERBOSE_SETTING)
    saved = {name: os.environ.get(name) for name in names}
    extra = [n.strip() for n in os.environ.get(EXTRA_LOGGERS, "").split(",") if n.strip()]
    if tasks.__name__ not in extra:
        os.environ[EXTRA_LOGGERS] = ",".join([*extra, tasks.__name__])
    if verbose:
        os.environ[VERBOSE_SETTING] = "1"
        os.environ.setdefault(TF_LOG_LEVEL, "0")
    else:
        os.environ.setdefault(TF_LOG_LEVEL, "3")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def console_log(verbose: bool, loggers: tuple[str, ...] = ("tasks", "service")) -> Iterator[None]:
    """Show ``loggers``' lines on stderr as ``image-search: message`` (INFO; DEBUG with
    ``--verbose``), for the commands that run without Prefect's logging."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    level = logging.DEBUG if verbose else logging.INFO
    saved = []
    for name in loggers:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, old_level, propagate in saved:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
            logger.propagate = propagate
