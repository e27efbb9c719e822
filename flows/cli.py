"""``image-search run``: every flow parameter as an option, run on Prefect locally.

Without ``PREFECT_API_URL`` Prefect starts a temporary local API server for the run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from flows.params import BACKEND_NAMES, SearchParams
from tasks.errors import ImageSearchError


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _converter(annotation: Any) -> tuple[Any, str]:
    """argparse type and metavar for a field annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _converter(args[0])
    if origin is list:
        return (lambda text: [t.strip() for t in text.split(",") if t.strip()]), "A,B"
    if annotation is int:
        return int, "N"
    if annotation is float:
        return float, "X"
    return str, "TEXT"


def build_parser() -> argparse.ArgumentParser:
    """The ``image-search`` parser; options mirror :class:`SearchParams` one to one."""
    parser = argparse.ArgumentParser(
        prog="image-search",
        description="Image-similarity search: STL-10 -> ResNet50 -> exact KNN on GPU and CPU.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run the image-search flow locally",
        description="Run the image-search flow; outputs land in --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for name, field in SearchParams.model_fields.items():
        conv, metavar = _converter(field.annotation)
        help_text = field.description or ""
        if name == "backends":
            help_text += f" Comma-separated, from: {', '.join(BACKEND_NAMES)}."
        if name in ("limit", "data_dir", "gpu_memory_fraction", "backends"):
            help_text += " 'none' or empty: the default."
            conv = _optional(conv)
        run.add_argument(
            _option(name),
            dest=name,
            type=_typed(conv, name),
            metavar=metavar,
            default=argparse.SUPPRESS,
            help=f"{help_text} (default: {field.default!r})",
        )
    run.add_argument(
        "--traceback", action="store_true", help="show the full traceback of an unexpected error"
    )
    return parser


def _optional(conv: Any) -> Any:
    def parse(text: str) -> Any:
        return None if text.strip().lower() in ("", "none") else conv(text)

    return parse


def _typed(conv: Any, name: str) -> Any:
    def parse(text: str) -> Any:
        try:
            return conv(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a valid value for {_option(name)}"
            ) from None

    parse.__name__ = name  # argparse names the type in its messages
    return parse


def format_validation_error(exc: ValidationError) -> str:
    """One line per bad parameter, naming the option, the value and what is allowed."""
    lines = []
    for err in exc.errors():
        loc = err["loc"][0] if err["loc"] else ""
        value = err.get("input")
        lines.append(f"{_option(str(loc))} = {value!r}: {err['msg']}")
    return "invalid parameters:\n  " + "\n  ".join(lines)


class _UserErrorWithoutTraceback(logging.Filter):
    """Console logs show a user-fixable error as its message alone, not as a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ImageSearchError):
            record.exc_info = None
            record.exc_text = None
        return True


def _quiet_console_tracebacks() -> None:
    """Attach the filter to every console handler Prefect configured."""
    loggers = [logging.getLogger(), *map(logging.getLogger, list(logging.root.manager.loggerDict))]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and not any(
                isinstance(f, _UserErrorWithoutTraceback) for f in handler.filters
            ):
                handler.addFilter(_UserErrorWithoutTraceback())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``image-search`` console script; returns the exit code."""
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    ns.pop("command")
    show_traceback = ns.pop("traceback", False)
    try:
        params = SearchParams(**ns)
    except ValidationError as exc:
        print(f"image-search: error: {format_validation_error(exc)}", file=sys.stderr)
        return 2
    if not os.environ.get("PREFECT_API_URL"):
        # The temporary local server need not report usage; a user's setting still wins.
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from flows.image_search import image_search

    if not show_traceback:
        _quiet_console_tracebacks()
    try:
        outputs = image_search(params)
    except ImageSearchError as exc:
        print(f"image-search: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("image-search: interrupted; run again to resume where it stopped", file=sys.stderr)
        return 130
    except Exception as exc:
        if show_traceback:
            raise
        print(
            f"image-search: unexpected {type(exc).__name__}: {exc}\n"
            f"(run again with --traceback for the details)",
            file=sys.stderr,
        )
        return 1
    print("\nimage-search finished. Outputs:")
    for name, path in outputs.items():
        print(f"  {name:<10} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
