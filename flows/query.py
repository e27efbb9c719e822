"""The ``image-search-query`` flow: ask an index for the nearest images of a few query images,
from the Prefect UI's Run form. Wiring only: the work is :func:`tasks.query.query_images`."""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow
from prefect.states import State
from pydantic import Field

from flows.reporting import failed, quiet_user_errors, show_task_logs
from tasks.errors import ImageSearchError
from tasks.query import query_images

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
Neighbours = Annotated[int, Field(ge=1, le=1000, description="Neighbours per query image.")]


@flow(name="image-search-query", log_prints=True)
def image_search_query(
    images: Images,
    index: IndexFolder = "image-search-out",
    k: Neighbours = 10,
) -> list[dict[str, Any]] | State:
    """Find the ``k`` nearest index images of each query image, with the index's own model;
    the neighbours appear as a picture and a table among the run's artifacts. A problem the
    user can fix ends the run Failed with its message alone."""
    quiet_user_errors()
    show_task_logs()
    try:
        return query_images(images, index, k)
    except ImageSearchError as exc:
        return failed(exc)
