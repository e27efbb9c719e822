"""The answers of a query as a person or a program reads them: rows (JSON, a table artifact),
a text table, and a picture of each query beside its neighbours."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from tasks.ask import THUMB, Answer, Index
from tasks.errors import ImageSearchError
from tasks.report.pictures import image_grid


def answer_rows(answers: Iterable[Answer]) -> list[dict[str, Any]]:
    """One row per (query, neighbour), with the tier it came from (``tier``, ``method``,
    ``recall_at_10``: see :class:`tasks.ask.Tier`), and one per query that failed (``error``
    set)."""
    rows: list[dict[str, Any]] = []
    for a in answers:
        if a.error is not None:
            rows.append({"query": a.query, "rank": None, "error": a.error})
            continue
        rows.extend(
            {
                "query": a.query,
                "rank": n.rank,
                "distance": n.distance,
                "image_id": n.image_id,
                "uri": n.uri,
                "label": n.label,
                **(a.tier.as_dict() if a.tier else {}),
            }
            for n in a.neighbours
        )
    return rows


def format_table(answers: Iterable[Answer]) -> str:
    """The answers as text: per query, a table of rank, distance, image id and URI, and the
    tier the answer came from."""
    lines: list[str] = []
    for a in answers:
        lines.append(f"query: {a.query}")
        if a.error is not None:
            lines.append(f"  error: {a.error}")
            continue
        width = max(8, *(len(str(n.image_id)) for n in a.neighbours))
        lines.append(f"  {'rank':>4}  {'distance':>10}  {'image_id':>{width}}  uri")
        lines.extend(
            f"  {n.rank:>4}  {n.distance:>10.4f}  {n.image_id:>{width}}  {n.uri}"
            for n in a.neighbours
        )
        if a.tier is not None:
            lines.append(f"  tier: {a.tier.describe()}")
    return "\n".join(lines)


def picture(index: Index, answers: Sequence[Answer], shown: int = 10, max_queries: int = 20) -> Any:
    """A grid: per answered query (at most ``max_queries``), the query image, then its first
    ``shown`` neighbours titled with their distances. Returns a PIL image."""
    answered = [a for a in answers if a.error is None and a.pixels is not None][:max_queries]
    if not answered:
        raise ImageSearchError("No query could be answered, so there is nothing to draw.")
    columns = 1 + min(shown, max(len(a.neighbours) for a in answered))
    tiles = np.full((len(answered) * columns, THUMB, THUMB, 3), 255, dtype=np.uint8)
    titles = [""] * len(tiles)
    for row, a in enumerate(answered):
        base = row * columns
        assert a.pixels is not None
        tiles[base] = a.pixels
        titles[base] = "query"
        near = a.neighbours[: columns - 1]
        tiles[base + 1 : base + 1 + len(near)] = index.thumbnails(n.image_id for n in near)
        for j, n in enumerate(near, start=1):
            titles[base + j] = f"{n.distance:.4g}"
    return image_grid(tiles, titles, columns=columns)
