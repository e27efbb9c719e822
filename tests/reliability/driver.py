"""The real ``image-search`` command line, with test hooks set from the environment.

Run as ``python -m tests.reliability.driver run ...``. Without any ``RELIABILITY_*`` variable it
is exactly ``python -m flows.cli``. The hooks:

- ``RELIABILITY_CHECKSUMS``: JSON ``{"tarball": md5|null, "members": {name: md5|null}}``, the
  sums the run expects instead of the official STL-10 ones (generated archives cannot match);
- ``RELIABILITY_ROWS_PER_PART``: rows per embedding-store part and per feature-file row group,
  so small runs have several;
- ``RELIABILITY_COUNT``: a file to which every embedded batch appends its number of images;
- ``RELIABILITY_PAUSE=point:n`` with ``RELIABILITY_PAUSE_FILE``: on the n-th time the run
  reaches ``point``, create the pause file and block there (until ``RELIABILITY_RESUME_FILE``
  exists, else until killed). Points: ``forward`` (before the n-th embedding batch),
  ``merge`` (after the n-th row group written into a feature file's temporary file),
  ``search`` (inside the n-th KNN search call, warm-ups included), ``extract`` (after the
  n-th MiB of a member streamed out of the tarball).

A test polls for the pause file, so the kill lands at a known moment without timing guesses.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

_hits: Counter[str] = Counter()


def _pause_point(point: str) -> None:
    """Block here when this is the configured pause point and hit count."""
    spec = os.environ.get("RELIABILITY_PAUSE", "")
    name, _, count = spec.partition(":")
    if name != point:
        return
    _hits[point] += 1
    if _hits[point] != int(count or 1):
        return
    Path(os.environ["RELIABILITY_PAUSE_FILE"]).write_text(f"{point}:{_hits[point]}\n")
    resume = os.environ.get("RELIABILITY_RESUME_FILE")
    while not (resume and Path(resume).exists()):
        time.sleep(0.02)


def _install() -> None:
    if spec := os.environ.get("RELIABILITY_CHECKSUMS"):
        import tasks.sources.resolve

        sums = json.loads(spec)
        tasks.sources.resolve.OFFICIAL = tasks.sources.resolve.Checksums(
            tarball=sums["tarball"], members=sums["members"]
        )
    if rows := os.environ.get("RELIABILITY_ROWS_PER_PART"):
        import tasks.catalog
        import tasks.features.store

        # Rows per embedding-store part and per row group of the feature files.
        tasks.catalog.PART_ROWS = int(rows)
        tasks.features.store.ROWS_PER_PART = int(rows)
    _install_forward_hook()
    _install_merge_hook()
    _install_search_hook()
    _install_extract_hook()


def _install_forward_hook() -> None:
    import tasks.features.embed

    original = tasks.features.embed.make_forward
    count_file = os.environ.get("RELIABILITY_COUNT")

    def make_forward(model: Any) -> Any:
        forward = original(model)

        def call(batch: Any) -> Any:
            _pause_point("forward")
            result = forward(batch)
            if count_file:
                with open(count_file, "a") as f:
                    f.write(f"{len(batch)}\n")
            return result

        return call

    tasks.features.embed.make_forward = make_forward


def _install_merge_hook() -> None:
    import pyarrow.parquet as pq

    original = pq.ParquetWriter.write_table

    def write_table(self: Any, table: Any, *args: Any, **kwargs: Any) -> None:
        original(self, table, *args, **kwargs)
        where = Path(str(self.where))
        if where.parent.name == "features" and where.name.startswith(".image-search-tmp."):
            _pause_point("merge")

    pq.ParquetWriter.write_table = write_table  # type: ignore[method-assign]


def _install_search_hook() -> None:
    import tasks.search.backends

    for make in tasks.search.backends.BACKENDS.values():
        cls = make if isinstance(make, type) else type(make())
        original = cls.search

        def search(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            result = _original(self, *args, **kwargs)
            _pause_point("search")
            return result

        cls.search = search  # type: ignore[method-assign]


def _install_extract_hook() -> None:
    import hashlib
    import types

    import tasks.sources.archive

    class PausingMd5:
        def __init__(self) -> None:
            self._h = hashlib.md5()

        def update(self, block: bytes) -> None:
            self._h.update(block)
            _pause_point("extract")

        def hexdigest(self) -> str:
            return self._h.hexdigest()

    tasks.sources.archive.hashlib = types.SimpleNamespace(md5=PausingMd5)  # type: ignore[attr-defined]


if __name__ == "__main__":
    _install()
    from flows.cli import main

    sys.exit(main())
