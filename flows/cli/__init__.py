"""The ``image-search`` command line: ``run`` (the Prefect flow, every parameter an option),
``query`` and ``serve`` (ask an index; no Prefect API).

The package by concern: :mod:`~flows.cli.commands` (the commands and their options),
:mod:`~flows.cli.signals` (exit statuses, SIGTERM, the one ladder that maps an outcome to a
status), :mod:`~flows.cli.environment` (logging and TensorFlow's start-up lines),
:mod:`~flows.cli.api` (the Prefect API a run reports to), :mod:`~flows.cli.run` and
:mod:`~flows.cli.ask` (the commands' work). ``--help`` imports neither TensorFlow nor Prefect.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pydantic import ValidationError

from flows.cli.commands import QueryCommand, RunCommand, ServeCommand, options_error, parse
from flows.cli.environment import command_environment, console_log
from flows.cli.signals import (
    EXIT_BAD_PARAMETERS,
    Stops,
    error,
    exit_status,
    note,
    stopped_as_errors,
)

__all__ = ["main", "parse"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``image-search`` console script; returns the exit status."""
    try:
        command = parse(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help, or a command line argparse could not read
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_PARAMETERS
    except ValidationError as exc:
        error(options_error(exc))
        return EXIT_BAD_PARAMETERS
    leave = argv is None  # the command is the process: a stop ends it at once
    with command_environment(command.verbose):
        if isinstance(command, RunCommand):
            from flows.cli.run import RESUME_HINT, run
            from flows.params import SearchParams

            params = SearchParams(**command.model_dump(exclude={"traceback", "verbose"}))
            return exit_status(
                lambda: run(params, command.traceback),
                traceback=command.traceback,
                leave=leave,
                stops=stopped_as_errors(RESUME_HINT),
            )
        from flows.cli import ask

        with console_log(command.verbose):
            if isinstance(command, QueryCommand):
                return exit_status(
                    lambda: ask.query(command),
                    traceback=command.traceback,
                    leave=leave,
                    stops=stopped_as_errors(),
                )
            assert isinstance(command, ServeCommand)
            return exit_status(
                lambda: ask.serve(command),
                traceback=command.traceback,
                leave=leave,
                stops=Stops(
                    interrupted=lambda: note("stopped (Ctrl-C); requests in flight were answered."),
                    terminated=lambda: note("stopped (SIGTERM); requests in flight were answered."),
                ),
            )
