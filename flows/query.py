"""The ``image-search-query`` flow: ask an index for the nearest images of a few query images,
from the Prefect UI's Run form. Wiring: the work is the query core's (:mod:`tasks.ask`), the
neighbours become a picture and a table artifact."""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import State
from pydantic import Field

from flows.reporting import failed, quiet_user_errors, show_task_logs
from tasks.ask import ask, lazy, load_forward, model_spec, open_index, query_sources
from tasks.errors import ImageSearchError
from tasks.report import artifact_key
from tasks.report.answers import answer_rows, picture
from tasks.report.pictures import markdown_image
from tasks.search.k import K

Images = Annotated[
    list[str],
    Field(
        min_length=1,
        description="Query images: files, folders of images or http(s)/s3:// URLs, on storage "
        "this run can read (a shared volume in Kubernetes).",
    ),
]
IndexFolder = Annotated[
    str,
    Field(min_length=1, description="The index: the output folder of an image-search run."),
]
_EXACT = (
    "Exact answers even where the index has an approximate one (used otherwise; the table "
    "says so, with its recall@10 measured when it was built)."
)
# Prefect's flow schema passes ``description=None`` over the annotation's own ``Field`` but
# merges ``json_schema_extra`` (as in flows.params).
Exact = Annotated[bool, Field(description=_EXACT, json_schema_extra={"description": _EXACT})]


@task(cache_policy=NO_CACHE)
def query_images(
    images: list[str], index_folder: str, k: int, exact: bool = False
) -> list[dict[str, Any]]:
    """Prefect task: answer ``images`` from the index in ``index_folder`` (``exact``: never
    from its approximate index); the neighbours as a picture and a table artifact. Returns the
    table's rows."""
    index = open_index(index_folder)
    spec = model_spec(index.meta)
    answers = ask(
        index,
        lazy(lambda: load_forward(spec, index.model_file)),
        query_sources(images),
        k,
        exact=exact,
    )
    rows = answer_rows(answers)
    failures = [a for a in answers if a.error is not None]
    log = get_run_logger()
    for a in failures:
        log.warning("%s: %s", a.query, a.error)
    if len(failures) < len(answers):
        create_markdown_artifact(
            key=artifact_key("query-neighbours"),
            markdown=markdown_image(
                picture(index, answers), "queries and their nearest index images"
            ),
            description=f"Each query (left) with its {k} nearest images of {index.folder}",
        )
    how = {a.tier.describe() for a in answers if a.tier is not None}
    create_table_artifact(
        key=artifact_key("query-results"),
        table=rows,
        description=f"Nearest images of {index.folder} ({len(index)} images), Euclidean; "
        + ("; ".join(sorted(how)) or "no answer"),
    )
    if len(failures) == len(answers):
        raise ImageSearchError(
            f"No query image could be used: {'; '.join(f'{a.query}: {a.error}' for a in failures)}"
        )
    return rows


@flow(name="image-search-query", log_prints=True)
def image_search_query(
    images: Images,
    index: IndexFolder = "image-search-out",
    k: K = 10,
    exact: Exact = False,
) -> list[dict[str, Any]] | State:
    """Find the ``k`` nearest index images of each query image, with the index's own model
    (from its approximate index, if it has one, unless ``exact``); the neighbours appear as a
    picture and a table among the run's artifacts. A problem the user can fix ends the run
    Failed with its message alone."""
    quiet_user_errors()
    show_task_logs()
    try:
        return query_images(images, index, k, exact)
    except ImageSearchError as exc:
        return failed(exc)
