"""The catalog stage's verdict on unusable images: too many stop the run, none usable stops it
whatever the allowed rate, and the message names the first reasons and where the rest are."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from tasks.catalog import ERRORS_SCHEMA, check_error_rate, write_errors
from tasks.errors import ImageSearchError
from tasks.layout import CATALOG_FILE, ERRORS_FILE
from tasks.types import CatalogRef


def catalogued(tmp_path: Path, listed: int, bad: int) -> CatalogRef:
    errors = pa.Table.from_pylist(
        [{"image_id": i, "uri": f"/photos/{i}.jpg", "reason": "not an image"} for i in range(bad)],
        schema=ERRORS_SCHEMA,
    )
    write_errors(tmp_path / ERRORS_FILE, errors)
    return CatalogRef(
        uri=str(tmp_path / CATALOG_FILE),
        rows=listed - bad,
        fingerprint="f",
        n_errors=bad,
        stats={"listed": listed, "errors": bad},
    )


def test_no_usable_image_stops_the_run_whatever_the_rate_allows(tmp_path: Path) -> None:
    with pytest.raises(ImageSearchError) as info:
        check_error_rate(catalogued(tmp_path, listed=3, bad=3), max_error_rate=1.0)
    message = str(info.value)
    assert message.startswith("None of the 3 images could be used. First: /photos/0.jpg: not an")
    assert f"Every reason is in {ERRORS_FILE}" in message


def test_errors_within_the_rate_pass_and_beyond_it_stop(tmp_path: Path) -> None:
    check_error_rate(catalogued(tmp_path, listed=100, bad=5), max_error_rate=0.05)
    with pytest.raises(ImageSearchError, match=r"6 of 100 images \(6.0%\) could not be used"):
        check_error_rate(catalogued(tmp_path, listed=100, bad=6), max_error_rate=0.05)
