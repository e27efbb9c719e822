"""The commands and their options: ``run`` takes every flow parameter (generated from
:class:`~flows.params.SearchParams` by pydantic-settings' command-line source, so names, bounds,
defaults and help are those of the flow's form in the Prefect UI); ``query`` and ``serve`` ask an
index. Parsing imports neither Prefect nor TensorFlow."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
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

from flows.cli.signals import EXIT_BAD_PARAMETERS, PROG
from flows.params import SearchParams, format_validation_error
from tasks.search.k import MAX_K, K

_TRACEBACK = "Show the full traceback of an unexpected error."
_VERBOSE = "Also show TensorFlow's own start-up lines (CUDA, oneDNN) and debug logs."


class RunCommand(SearchParams):
    """Index a collection and compare the search backends (the Prefect flow); outputs land in
    --out."""

    traceback: CliToggleFlag[bool] = Field(False, description=_TRACEBACK)
    verbose: CliToggleFlag[bool] = Field(False, description=_VERBOSE)


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
    k: K = 10
    exact: CliToggleFlag[bool] = Field(
        False,
        description="Exact answers even where the index has an approximate one (which it "
        "uses otherwise, with its measured recall shown).",
    )
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
    traceback: CliToggleFlag[bool] = Field(False, description=_TRACEBACK)
    verbose: CliToggleFlag[bool] = Field(False, description=_VERBOSE)


class ServeCommand(BaseModel):
    """Serve an index over HTTP: a page at /, POST /search, GET /images/ID, GET /healthz, and
    the API's description at /docs. Beyond loopback every request but /healthz needs the token
    in $IMAGE_SEARCH_TOKEN (header 'Authorization: Bearer TOKEN'; a browser opens /?token=TOKEN
    once)."""

    model_config = ConfigDict(extra="forbid")

    index: str = Field(
        description="The index: the --out folder of a finished `image-search run`; a run that "
        "commits a new index there is picked up without a restart.",
        min_length=1,
    )
    host: str = Field(
        "127.0.0.1",
        description="Address to listen on (0.0.0.0: every interface; beyond loopback the "
        "service needs a token in $IMAGE_SEARCH_TOKEN, or --no-token).",
    )
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
    max_k: int = Field(
        100, ge=1, le=MAX_K, description="Most neighbours one request may ask for (422 beyond)."
    )
    reload_interval: float = Field(
        2.0, gt=0, le=3600, description="Seconds between checks for a newly committed index."
    )
    allowed_host: list[str] = Field(
        default_factory=list,
        description="A host name clients reach the service by (repeat for more; '*' for any). "
        "Requests addressed to any other name are refused (400); loopback names and the --host "
        "address are always answered.",
    )
    no_token: CliToggleFlag[bool] = Field(
        False,
        description="Serve beyond loopback without a token: only behind a proxy that checks "
        "who comes in.",
    )
    allow_url_search: CliToggleFlag[bool] = Field(
        False,
        description="Accept searches by URL beyond loopback too (on loopback they are on). "
        "Only public addresses are fetched, after every redirect.",
    )
    allow_url_network: list[str] = Field(
        default_factory=list,
        description="An address or network (10.0.0.0/8) that searches by URL may fetch from "
        "although it is private or loopback (repeat for more).",
    )
    url_timeout: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Seconds one fetch by URL may take in all, redirects included.",
    )
    traceback: CliToggleFlag[bool] = Field(False, description=_TRACEBACK)
    verbose: CliToggleFlag[bool] = Field(False, description=_VERBOSE)


Command = RunCommand | QueryCommand | ServeCommand


class _Commands(BaseSettings):
    """Image-similarity search: index your photos (or STL-10) with ResNet50, then ask the index
    from the command line, a Prefect run or a web page."""

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

    run: CliSubCommand[RunCommand] = Field(
        description="Index a collection (folder, archive, list of paths or URLs, STL-10) with "
        "ResNet50 and compare exact search backends: the Prefect flow, run from here."
    )
    query: CliSubCommand[QueryCommand] = Field(
        description="Find the nearest indexed images of image files, folders or URLs."
    )
    serve: CliSubCommand[ServeCommand] = Field(
        description="Serve an index over HTTP: a web page, a search API and its docs."
    )

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


def options_error(exc: ValidationError) -> str:
    """What is wrong with the options, one line per bad one: the option, the value given and
    what is allowed (``run``'s as its parameters, ``query``'s and ``serve``'s as options)."""
    asks = any(err["loc"][:1] in (("query",), ("serve",)) for err in exc.errors())
    if not asks:
        return format_validation_error(exc)
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
