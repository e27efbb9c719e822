"""How a command ends: its exit status, decided in one place for every command.

0 done; 1 a problem the user can fix (the message names the fix); 2 bad options (nothing ran);
130 interrupted (Ctrl-C); 143 terminated (SIGTERM: Kubernetes, systemd, ``kill``). No traceback
unless ``--traceback``.

A stopped command leaves within a second or two of its clean-up, even while a thread is stuck in
a slow read (an image URL that trickles): thread pools shut down by the stop cancel their queued
work instead of waiting for their workers, and the process then ends without joining threads
that are still reading (:func:`exit_status`). Whatever else holds it (a library that swallows
the interrupt, an exit handler waiting on a server), it ends :data:`STOP_DEADLINE_S` after the
signal, as Kubernetes ends a pod after its grace period.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from tasks.errors import ImageSearchError, option_name, worded

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_BAD_PARAMETERS = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM
PROG = "image-search"


EXIT_GRACE_S = 0.5  # how long a stopped command waits for its other threads to end
STOP_DEADLINE_S = 20.0  # the longest a stopped command may take over its clean-up


class Terminated(BaseException):
    """SIGTERM arrived: stop like Ctrl-C does."""


STOPPING = threading.Event()
"""Set once the command is being stopped (Ctrl-C, SIGTERM, whoever's handler saw it first)."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    STOPPING.set()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough; clean up undisturbed
    _arm_deadline(EXIT_TERMINATED, lambda stops: stops.terminated())
    raise Terminated


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    STOPPING.set()
    _arm_deadline(EXIT_INTERRUPTED, lambda stops: stops.interrupted())
    raise KeyboardInterrupt


def _is_stop(exc: BaseException | None) -> bool:
    """A stop rather than an error: Ctrl-C, SIGTERM (ours or Prefect's), an exit."""
    return isinstance(exc, BaseException) and not isinstance(exc, Exception | GeneratorExit)


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` in the main thread (Prefect and uvicorn re-deliver
    it here after their own clean-up), and note every stop in :data:`STOPPING`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:
        signal.signal(signal.SIGINT, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous_int)


@contextmanager
def pools_let_go_when_stopped() -> Iterator[None]:
    """While the command runs, a thread pool shut down by a stop (its ``with`` block left by
    Ctrl-C or SIGTERM, or any shutdown once the command is stopping) cancels its queued work and
    does not wait for its workers: one stuck in a slow read would hold the stop until its
    deadline. Other shutdowns wait as they always do."""
    pool_class = concurrent.futures.ThreadPoolExecutor
    original = pool_class.shutdown

    def shutdown(self: Any, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if _is_stop(sys.exc_info()[1]):
            STOPPING.set()
        if wait and STOPPING.is_set():
            original(self, wait=False, cancel_futures=True)
            return
        original(self, wait=wait, cancel_futures=cancel_futures)

    pool_class.shutdown = shutdown  # type: ignore[method-assign]
    try:
        yield
    finally:
        pool_class.shutdown = original  # type: ignore[method-assign]


def leave_after_stop(status: int) -> None:
    """End a stopped command now: its clean-up has run; give its other threads
    :data:`EXIT_GRACE_S` to end, run the exit handlers (log flushing and the like), then end
    the process without joining a thread that is still stuck (a reader in a slow read would hold
    the interpreter's exit until its deadline, minutes later)."""
    deadline = time.monotonic() + EXIT_GRACE_S
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    try:
        atexit._run_exitfuncs()
        logging.shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with suppress(OSError, ValueError):
                stream.flush()
        os._exit(status)


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


@dataclass
class _Leaving:
    """The command that is the process (``exit_status(leave=True)``): what it says when
    stopped, and whether it has said it."""

    stops: Stops | None = None
    said: threading.Event = field(default_factory=threading.Event)
    armed: bool = False


_LEAVING = _Leaving()


def _arm_deadline(status: int, say: Callable[[Stops], None]) -> None:
    """End the process :data:`STOP_DEADLINE_S` after the first stop, whatever holds it; only
    when the command is the process."""
    if _LEAVING.stops is None or _LEAVING.armed:
        return
    _LEAVING.armed = True
    stops = _LEAVING.stops

    def expire() -> None:
        if not _LEAVING.said.is_set():
            say(stops)
        note(f"its clean-up took over {STOP_DEADLINE_S:g} s; stopped without the rest of it.")
        for stream in (sys.stdout, sys.stderr):
            with suppress(OSError, ValueError):
                stream.flush()
        os._exit(status)

    timer = threading.Timer(STOP_DEADLINE_S, expire)
    timer.daemon = True
    timer.start()


def exit_status(
    body: Callable[[], int], *, traceback: bool, stops: Stops, leave: bool = False
) -> int:
    """Run a command's ``body`` with SIGTERM turned into :class:`Terminated`; its exit status.

    The one ladder: a user's mistake is one line and 1, Ctrl-C 130, SIGTERM 143, anything
    unexpected one line and 1 (its traceback with ``--traceback``). With ``leave`` (the command
    is the process), a stopped command ends the process at once: :func:`leave_after_stop`.
    """
    if leave:
        _LEAVING.stops = stops
    try:
        with stop_on_sigterm(), pools_let_go_when_stopped():
            return body()
    except ImageSearchError as exc:
        error(exc)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        stops.interrupted()
        _LEAVING.said.set()
        if leave:
            leave_after_stop(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except Terminated:
        stops.terminated()
        _LEAVING.said.set()
        if leave:
            leave_after_stop(EXIT_TERMINATED)
        return EXIT_TERMINATED
    except Exception as exc:
        if traceback:
            raise
        error(
            f"unexpected {type(exc).__name__}: {exc}\n(run again with --traceback for the details)"
        )
        return EXIT_USER_ERROR
