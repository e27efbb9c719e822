"""How a command ends: its exit status, decided in one place for every command.

0 done; 1 a problem the user can fix (the message names the fix); 2 bad options (nothing ran);
130 interrupted (Ctrl-C); 143 terminated (SIGTERM: Kubernetes, systemd, ``kill``). No traceback
unless ``--traceback``.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from tasks.errors import ImageSearchError, option_name, worded

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_BAD_PARAMETERS = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM
PROG = "image-search"


class Terminated(BaseException):
    """SIGTERM arrived: stop like Ctrl-C does."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough; clean up undisturbed
    raise Terminated


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` in the main thread (Prefect and uvicorn re-deliver
    it here after their own clean-up)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def error(message: str | ImageSearchError) -> None:
    """One line on stderr, ``image-search: error: ...``; settings named as options."""
    text = message.worded(option_name) if isinstance(message, ImageSearchError) else message
    print(f"{PROG}: error: {worded(text, option_name)}", file=sys.stderr)


def note(message: str) -> None:
    """One line on stderr that is not an error."""
    print(f"{PROG}: {message}", file=sys.stderr)


@dataclass(frozen=True)
class Stops:
    """What a command says when it is stopped by Ctrl-C or SIGTERM."""

    interrupted: Callable[[], None]
    terminated: Callable[[], None]


def stopped_as_errors(hint: str = "") -> Stops:
    """A stop that leaves work unfinished: an error line, with ``hint`` (how to resume)."""
    tail = f"; {hint}" if hint else ""
    return Stops(
        interrupted=lambda: error(f"interrupted{tail}."),
        terminated=lambda: error(f"terminated{tail}."),
    )


def exit_status(body: Callable[[], int], *, traceback: bool, stops: Stops) -> int:
    """Run a command's ``body`` with SIGTERM turned into :class:`Terminated`; its exit status.

    The one ladder: a user's mistake is one line and 1, Ctrl-C 130, SIGTERM 143, anything
    unexpected one line and 1 (its traceback with ``--traceback``).
    """
    try:
        with stop_on_sigterm():
            return body()
    except ImageSearchError as exc:
        error(exc)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        stops.interrupted()
        return EXIT_INTERRUPTED
    except Terminated:
        stops.terminated()
        return EXIT_TERMINATED
    except Exception as exc:
        if traceback:
            raise
        error(
            f"unexpected {type(exc).__name__}: {exc}\n(run again with --traceback for the details)"
        )
        return EXIT_USER_ERROR
