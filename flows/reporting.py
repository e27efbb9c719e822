"""How a run tells its reader what happened, wherever it runs (command line, worker, pod).

A problem the user can fix (:class:`~tasks.errors.ImageSearchError`, a bad combination of
parameters) ends the run Failed with its message alone: no traceback in the run's log, the
parameters named as form fields (the command line words them as options itself). Real bugs
keep their tracebacks. The pure functions' own log lines (``tasks.*``) are part of the run's
log.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from prefect import get_run_logger
from prefect.exceptions import MissingContextError
from prefect.states import Failed, State
from pydantic import ValidationError

from flows.params import SearchParams, format_validation_error, overlap_message
from tasks.errors import ImageSearchError, param, worded
from tasks.sources.cache import DATA_ENV, default_data_dir

# Where Prefect logs a failed task or flow run, with the exception attached.
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
# The pure functions' loggers; PREFECT_LOGGING_EXTRA_LOGGERS ships them to the API.
TASK_LOGGER = "tasks"


class ForTheReader(logging.Filter):
    """A run log line as its reader needs it: a user-fixable error as its message alone (the
    traceback would only bury it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ImageSearchError):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_user_errors() -> None:
    """Install :class:`ForTheReader` on Prefect's run loggers (console and API alike), which
    also log the task and flow states that carry a user error's message."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, ForTheReader) for f in logger.filters):
            logger.addFilter(ForTheReader())


def show_task_logs() -> None:
    """Let the pure functions' INFO lines through (Python's default threshold is WARNING), at
    Prefect's logging level, unless the ``tasks`` logger was configured otherwise."""
    from prefect.settings import PREFECT_LOGGING_LEVEL

    logger = logging.getLogger(TASK_LOGGER)
    if logger.level == logging.NOTSET:
        logger.setLevel(PREFECT_LOGGING_LEVEL.value())


def separate_folders(params: SearchParams) -> None:
    """Refuse an output folder that overlaps the default data cache (an explicit
    ``data_dir`` is checked by :class:`SearchParams` itself)."""
    if params.data_dir is not None:
        return
    clash = overlap_message(params.out, default_data_dir())
    if clash:
        raise ImageSearchError(
            f"{clash} The data cache comes from ${DATA_ENV}, else the per-user cache folder; "
            f"{param('data_dir')} sets it for one run."
        )


def failed(exc: ImageSearchError | ValidationError) -> State[Any]:
    """The Failed state that ends a run stopped by a user error: the message alone, naming the
    parameters as form fields. Calling the flow raises it as an ImageSearchError, which still
    carries the parameters as :func:`~tasks.errors.param` for the command line to word."""
    raw = format_validation_error(exc) if isinstance(exc, ValidationError) else exc.args[0]
    with contextlib.suppress(MissingContextError):  # the run's log says it too, not only its state
        get_run_logger().error(worded(raw))
    return Failed(message=worded(raw), data=ImageSearchError(raw))
