"""``image-search run``: the flow, on a Prefect API, from this machine's terminal."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from flows.cli.api import prefect_api
from flows.cli.signals import EXIT_OK, EXIT_USER_ERROR, Terminated, error
from flows.params import SearchParams

RESUME_HINT = "run the same command again to resume where it stopped"


class _NoTraceback(logging.Filter):
    """Console output shows messages, not tracebacks (``--traceback`` shows them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        return True


@contextmanager
def console_without_tracebacks() -> Iterator[None]:
    """Attach :class:`_NoTraceback` to every console handler Prefect configured, for the run.

    Handlers sending to the API keep tracebacks of real bugs: they format a record before
    it reaches the console, which is further up the logger tree.
    """
    loggers = [logging.getLogger(), *map(logging.getLogger, list(logging.root.manager.loggerDict))]
    handlers = {
        handler
        for logger in loggers
        for handler in getattr(logger, "handlers", [])
        if isinstance(handler, logging.StreamHandler)
    }
    quiet = _NoTraceback()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


def run(params: SearchParams, show_traceback: bool) -> int:
    """Run the flow on a Prefect API; the exit status."""
    from prefect.exceptions import TerminationSignal

    try:
        with prefect_api() as ready:
            # Prefect and the flow's modules load while a local API starts.
            from flows.image_search import image_search

            ready()
            with nullcontext() if show_traceback else console_without_tracebacks():
                state = image_search(**params.model_dump(), return_state=True)
            outcome = state.result(raise_on_failure=False)
    except TerminationSignal as exc:
        raise Terminated from exc
    if isinstance(outcome, BaseException):  # a user's mistake (ImageSearchError) or a bug
        raise outcome
    if not state.is_completed() or not isinstance(outcome, dict):
        error(f"the run ended {state.name}: {state.message}")
        return EXIT_USER_ERROR
    print("\nimage-search finished. Outputs:")
    for name, path in outcome.items():
        print(f"  {name:<10} {path}")
    return EXIT_OK
