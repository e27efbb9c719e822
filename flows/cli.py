"""``image-search run``: every flow parameter as an option, run on Prefect from this machine.
``image-search query`` and ``image-search serve`` ask an index that a run built (no Prefect).

The options are generated from :class:`~flows.params.SearchParams` by pydantic-settings'
command-line source, so names, bounds, defaults and help are those of the flow's form in the
Prefect UI, and values are checked by the same pydantic types.

Exit status: 0 done; 1 a problem the user can fix (the message names the fix); 2 bad
parameters (nothing ran); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM). No traceback
unless ``--traceback``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from types import FrameType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    CliApp,
    CliPositionalArg,
    CliSettingsSource,
    CliSubCommand,
    CliToggleFlag,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

import tasks
from flows.local_api import TemporaryApi, check_api, startup_timeout
from flows.params import SearchParams, format_validation_error
from tasks.errors import ImageSearchError, option_name, worded

PROG = "image-search"
EXIT_USER_ERROR = 1
EXIT_BAD_PARAMETERS = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM
RESUME_HINT = "run the same command again to resume where it stopped"
EXTRA_LOGGERS = "PREFECT_LOGGING_EXTRA_LOGGERS"


class RunCommand(SearchParams):
    """Run the image-search flow; outputs land in --out."""

    traceback: CliToggleFlag[bool] = Field(
        False, description="Show the full traceback of an unexpected error."
    )


class QueryCommand(BaseModel):
    """Find the nearest images of an index for each query image (no Prefect API needed)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    images: CliPositionalArg[list[str]] = Field(
        description="Query images: image files, folders of images (searched recursively) or "
        "http(s) URLs."
    )
    index: str = Field(
        description="The index: the --out folder of a finished `image-search run`.", min_length=1
    )
    k: int = Field(10, ge=1, le=1000, description="Neighbours per query.")
    as_json: CliToggleFlag[bool] = Field(
        False, alias="json", description="Print the results as JSON instead of a table."
    )
    picture: str | None = Field(
        None, description="Also draw each query with its neighbours into this PNG file."
    )
    weights: str | None = Field(
        None,
        description="Weights you expect the index to use ('imagenet', 'none' or a file); "
        "refused when the index was built with others. Default: the index's own.",
    )
    traceback: CliToggleFlag[bool] = Field(
        False, description="Show the full traceback of an unexpected error."
    )


class ServeCommand(BaseModel):
    """Serve an index over HTTP: a page at /, POST /search, GET /images/ID, GET /healthz."""

    model_config = ConfigDict(extra="forbid")

    index: str = Field(
        description="The index: the --out folder of a finished `image-search run`; a run that "
        "commits a new index there is picked up without a restart.",
        min_length=1,
    )
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0: every interface).")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    weights: str | None = Field(
        None,
        description="Weights you expect the index to use; refused when it was built with "
        "others. Default: the index's own.",
    )
    max_upload_mb: float = Field(
        20, gt=0, le=1024, description="Largest request body accepted, in MiB (413 beyond)."
    )
    max_pixels: int = Field(
        50_000_000, ge=64, description="Largest image decoded, in pixels (413 beyond)."
    )
    max_concurrency: int = Field(
        16, ge=1, le=1024, description="Searches in progress at once; more are answered 503."
    )
    max_batch: int = Field(
        8, ge=1, le=256, description="Concurrent queries embedded and searched together."
    )
    reload_interval: float = Field(
        2.0, gt=0, le=3600, description="Seconds between checks for a newly committed index."
    )
    traceback: CliToggleFlag[bool] = Field(
        False, description="Show the full traceback of an unexpected error."
    )


Command = RunCommand | QueryCommand | ServeCommand


class _Commands(BaseSettings):
    """Image-similarity search: STL-10 -> ResNet50 -> exact KNN on GPU and CPU."""

    model_config = SettingsConfigDict(
        cli_prog_name=PROG,
        cli_kebab_case=True,
        # Optional parameters read 'none' themselves (flows.params); pydantic-settings' own
        # word for None applies to every option, so it must not be one: `--weights none`.
        cli_parse_none_str="null",
        cli_hide_none_type=True,
        cli_avoid_json=True,
        cli_implicit_flags="toggle",
        case_sensitive=True,
    )

    run: CliSubCommand[RunCommand]
    query: CliSubCommand[QueryCommand]
    serve: CliSubCommand[ServeCommand]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Options only: an environment variable that happens to be called `k` or `out` must not
        # change a run.
        return (init_settings,)


def _long_options(parser: Any, *names: str, **kwargs: Any) -> Any:
    """Add an option, long as documented: pydantic-settings gives one-letter fields (``k``) a
    single dash."""
    names = tuple("-" + n if len(n) == 2 and n[0] == "-" and n != "-h" else n for n in names)
    return parser.add_argument(*names, **kwargs)


def parse(argv: Sequence[str]) -> Command:
    """The chosen command's options, validated.

    Raises SystemExit (0 after ``--help``, 2 for a malformed command line, with argparse's
    usage) or ValidationError (a value out of bounds).
    """
    source: CliSettingsSource[argparse.ArgumentParser] = CliSettingsSource(
        _Commands, add_argument_method=_long_options
    )
    commands = CliApp.run(_Commands, cli_args=list(argv), cli_settings_source=source)
    chosen = commands.run or commands.query or commands.serve
    if chosen is None:
        source.root_parser.error(
            "choose a command: run, query or serve (see image-search run --help)"
        )
        raise SystemExit(EXIT_BAD_PARAMETERS)  # not reached: error() exits
    return chosen


class Terminated(BaseException):
    """SIGTERM arrived (Kubernetes, systemd, kill): stop like Ctrl-C does."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough; clean up undisturbed
    raise Terminated


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` in the main thread (Prefect re-delivers it here
    after recording the run as crashed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _run_environment() -> Iterator[None]:
    """Before Prefect is imported: ship the pure functions' log lines (``tasks.*``) to the
    API with Prefect's own, and keep TensorFlow's C++ start-up chatter off the console."""
    saved = {name: os.environ.get(name) for name in (EXTRA_LOGGERS, "TF_CPP_MIN_LOG_LEVEL")}
    names = [n.strip() for n in os.environ.get(EXTRA_LOGGERS, "").split(",") if n.strip()]
    if tasks.__name__ not in names:
        os.environ[EXTRA_LOGGERS] = ",".join([*names, tasks.__name__])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _prefect_api() -> Iterator[TemporaryApi | None]:
    """The configured Prefect API, checked; else a temporary one started for this run.

    Yields the temporary server (still starting: call ``wait_ready``) or None. On the way out
    the run's last logs and events reach the server before it stops.
    """
    from prefect.settings import PREFECT_API_URL

    configured = PREFECT_API_URL.value()
    if configured:
        check_api(configured)
        yield None
        return
    print(
        f"{PROG}: starting a temporary Prefect API for this run "
        f"(set PREFECT_API_URL to use a running server)",
        file=sys.stderr,
    )
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    api = TemporaryApi(startup_timeout())
    api.start()
    try:
        yield api
    finally:
        _drain_to_api()
        api.stop()
        _use_api(None)


def _use_api(url: str | None) -> None:
    """Point every Prefect client of this process at ``url`` (None: back to unset)."""
    from prefect.context import refresh_global_settings_context

    if url is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = url
    refresh_global_settings_context()


def _drain_to_api(timeout: float = 10.0) -> None:
    """Send the logs and events still queued, so the run's record is complete."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout, at_exit=False)
        except Exception:  # a worker that never started, or a server already gone
            logging.getLogger(__name__).debug("draining %s failed", worker, exc_info=True)


class _NoTraceback(logging.Filter):
    """Console output shows messages, not tracebacks (``--traceback`` shows them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        return True


@contextmanager
def _console_without_tracebacks() -> Iterator[None]:
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


def _error(message: str | ImageSearchError) -> None:
    """One line on stderr; settings named as options."""
    text = message.worded(option_name) if isinstance(message, ImageSearchError) else message
    print(f"{PROG}: error: {worded(text, option_name)}", file=sys.stderr)


def _run(params: SearchParams, show_traceback: bool) -> int:
    """Run the flow on a Prefect API; the exit status."""
    from prefect.exceptions import TerminationSignal

    try:
        with _prefect_api() as api:
            # TensorFlow and Prefect load while a temporary API starts.
            from flows.image_search import image_search

            if api is not None:
                api.wait_ready()
                _use_api(api.url)
            with nullcontext() if show_traceback else _console_without_tracebacks():
                state = image_search(**params.model_dump(), return_state=True)
            outcome = state.result(raise_on_failure=False)
    except TerminationSignal as exc:
        raise Terminated from exc
    except ImageSearchError as exc:
        _error(exc)
        return EXIT_USER_ERROR
    if isinstance(outcome, ImageSearchError):
        _error(outcome)
        return EXIT_USER_ERROR
    if isinstance(outcome, BaseException):
        raise outcome
    if not state.is_completed() or not isinstance(outcome, dict):
        _error(f"the run ended {state.name}: {state.message}")
        return EXIT_USER_ERROR
    print(f"\n{PROG} finished. Outputs:")
    for name, path in outcome.items():
        print(f"  {name:<10} {path}")
    return 0


def _asks(exc: ValidationError) -> bool:
    """Whether ``exc`` is about the options of ``query`` or ``serve``."""
    return any(err["loc"][:1] in (("query",), ("serve",)) for err in exc.errors())


def _options_error(exc: ValidationError) -> str:
    """One line per bad option of ``query``/``serve``: the option, the value, what is allowed."""
    lines = []
    for err in exc.errors(include_url=False):
        names = [p for p in err["loc"][1:] if isinstance(p, str)]
        message = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
        if names:
            given = err.get("input")
            shown = shlex.quote(given) if isinstance(given, str) else repr(given)
            message = f"--{names[-1].replace('_', '-')} = {shown}: {message}"
        lines.append(message)
    return "invalid options:\n  " + "\n  ".join(lines)


def _ask(command: QueryCommand | ServeCommand) -> int:
    """Run ``query`` or ``serve``; the exit status. A user's mistake is one line, exit 1."""
    try:
        if isinstance(command, QueryCommand):
            return _query(command)
        return _serve(command)
    except ImageSearchError as exc:
        _error(exc)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _error("interrupted.")
        return EXIT_INTERRUPTED
    except Terminated:
        _error("terminated.")
        return EXIT_TERMINATED
    except Exception as exc:
        if command.traceback:
            raise
        _error(
            f"unexpected {type(exc).__name__}: {exc}\n(run again with --traceback for the details)"
        )
        return EXIT_USER_ERROR


def _query(command: QueryCommand) -> int:
    """Answer the query images from the index: a table (or JSON) on stdout, and a picture."""
    import json
    from pathlib import Path

    from tasks.query import (
        answer_rows,
        ask,
        check_k,
        format_table,
        load_forward,
        model_spec,
        open_index,
        picture,
        query_sources,
    )
    from tasks.report.pictures import save_png

    index = open_index(command.index)
    spec = model_spec(index.meta, command.weights)
    k = check_k(command.k, index)
    uris = query_sources(command.images)  # a missing path is named before the model loads
    if spec.weights == "none":
        print(
            f"{PROG}: note: the index was built with random weights; neighbours are exact but "
            f"say nothing about what the images show.",
            file=sys.stderr,
        )
    answers = ask(index, load_forward(spec), uris, k)
    if command.as_json:
        print(json.dumps(answer_rows(answers), indent=1))
    else:
        print(format_table(answers))
    failed = [a for a in answers if a.error is not None]
    if command.picture and len(failed) < len(answers):
        save_png(picture(index, answers), Path(command.picture).expanduser())
        print(f"{PROG}: picture written to {command.picture}", file=sys.stderr)
    if failed:
        for a in failed:
            _error(f"{a.query}: {a.error}")
        _error(f"{len(failed)} of {len(answers)} query images could not be used.")
        return EXIT_USER_ERROR
    return 0


def _serve(command: ServeCommand) -> int:
    """Serve the index until Ctrl-C or SIGTERM."""
    from service.app import Limits
    from service.server import serve

    serve(
        command.index,
        host=command.host,
        port=command.port,
        weights=command.weights,
        limits=Limits(
            max_upload_bytes=int(command.max_upload_mb * 2**20),
            max_pixels=command.max_pixels,
            max_concurrency=command.max_concurrency,
        ),
        max_batch=command.max_batch,
        reload_interval=command.reload_interval,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``image-search`` console script; returns the exit status."""
    try:
        command = parse(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help, or a command line argparse could not read
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_PARAMETERS
    except ValidationError as exc:
        _error(_options_error(exc) if _asks(exc) else format_validation_error(exc))
        return EXIT_BAD_PARAMETERS
    if isinstance(command, QueryCommand | ServeCommand):
        with _run_environment(), _stop_on_sigterm():
            return _ask(command)
    params = SearchParams(**command.model_dump(exclude={"traceback"}))
    with _run_environment(), _stop_on_sigterm():
        try:
            return _run(params, command.traceback)
        except KeyboardInterrupt:
            _error(f"interrupted; {RESUME_HINT}.")
            return EXIT_INTERRUPTED
        except Terminated:
            _error(f"terminated; {RESUME_HINT}.")
            return EXIT_TERMINATED
        except Exception as exc:
            if command.traceback:
                raise
            _error(
                f"unexpected {type(exc).__name__}: {exc}\n"
                f"(run again with --traceback for the details)"
            )
            return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
