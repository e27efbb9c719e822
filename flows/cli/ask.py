"""``image-search query`` and ``image-search serve``: ask an index through the query core, with
no Prefect API and no TensorFlow unless the index has no exported model."""

from __future__ import annotations

import json
import os
from pathlib import Path

from flows.cli.commands import QueryCommand, ServeCommand
from flows.cli.signals import EXIT_OK, EXIT_USER_ERROR, error, note
from tasks.errors import ImageSearchError, param


def query(command: QueryCommand) -> int:
    """Answer the query images from the index: a table (or JSON) on stdout, a picture if asked.
    A query that cannot be used is named and the others are answered (exit status 1)."""
    from tasks.ask import ask, lazy, load_forward, model_spec, open_index, query_sources
    from tasks.report.answers import answer_rows, format_table, picture

    picture_path = _picture_path(command.picture) if command.picture else None
    index = open_index(command.index)
    spec = model_spec(index.meta, command.weights)
    answers = query_sources(command.images)
    if spec.weights == "none":
        note(
            "the index was built with random weights; neighbours are exact but say nothing "
            "about what the images show."
        )
    ask(
        index,
        lazy(lambda: load_forward(spec, index.model_file)),
        answers,
        command.k,
        exact=command.exact,
    )
    if command.as_json:
        print(json.dumps(answer_rows(answers), indent=1))
    else:
        print(format_table(answers))
    failed = [a for a in answers if a.error is not None]
    if picture_path is not None and len(failed) < len(answers):
        from tasks.report.pictures import save_png

        save_png(picture(index, answers), picture_path)
        note(f"picture written to {picture_path}")
    if failed:
        for a in failed:
            error(f"{a.query}: {a.error}")
        error(f"{len(failed)} of {len(answers)} query images could not be used.")
        return EXIT_USER_ERROR
    return EXIT_OK


def _picture_path(given: str) -> Path:
    """Where ``--picture`` writes: a PNG file whose folder exists; refused before any work."""
    path = Path(given).expanduser()
    if path.is_dir():
        raise ImageSearchError(
            f"{param('picture')} {given} is a folder; give the PNG file to write, such as "
            f"{path / 'neighbours.png'}."
        )
    if not path.parent.is_dir():
        raise ImageSearchError(
            f"{param('picture')} {given}: folder {path.parent} does not exist; create it or "
            f"choose another file."
        )
    return path


def serve(command: ServeCommand) -> int:
    """Serve the index until Ctrl-C or SIGTERM (raised here after uvicorn's clean shutdown).
    The token comes from the environment, never the command line (which every user of the
    machine can read)."""
    from service.app import Limits
    from service.security import TOKEN_ENV, decide_access
    from service.server import serve as run_server

    access, notes = decide_access(
        host=command.host,
        token=os.environ.get(TOKEN_ENV),
        no_token=command.no_token,
        allowed_hosts=command.allowed_host,
        allow_url_search=command.allow_url_search,
        url_networks=command.allow_url_network,
    )
    run_server(
        command.index,
        host=command.host,
        port=command.port,
        weights=command.weights,
        limits=Limits(
            max_upload_bytes=int(command.max_upload_mb * 2**20),
            max_pixels=command.max_pixels,
            max_concurrency=command.max_concurrency,
            max_k=command.max_k,
            url_timeout_s=command.url_timeout,
        ),
        access=access,
        max_batch=command.max_batch,
        reload_interval=command.reload_interval,
        notes=notes,
    )
    return EXIT_OK
