"""How many neighbours a search may ask for: the bound, declared once, and the one check of
``k`` against an index. Every edge (the run's parameters, the query command and flow, the
service) annotates ``k`` with :data:`K`; every search checks it with :func:`check_k`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from tasks.errors import ImageSearchError, param

MAX_K = 1000
"""The most neighbours any search returns per query (a service may cap lower, never higher)."""

_DESCRIPTION = "Neighbours per query."

# Prefect's flow schema passes ``description=None`` over the annotation's own ``Field`` but
# merges ``json_schema_extra``, so the description travels there as well (as in flows.params).
K = Annotated[
    int,
    Field(
        ge=1, le=MAX_K, description=_DESCRIPTION, json_schema_extra={"description": _DESCRIPTION}
    ),
]


def check_k(k: int, n_index: int, *, index: str = "", fix: str = "") -> int:
    """``k``, checked against an index of ``n_index`` images: 1 <= k <= min(n_index, MAX_K).

    ``index`` names the index in the message ("the index in /photos/out"); ``fix`` adds what
    else the user may change besides ``k``. Raises ImageSearchError with scikit-learn's wording:
    the exact numbers and the fix.
    """
    k_ = param("k")
    if k < 1:
        raise ImageSearchError(f"{k_} = {k}; it must be at least 1.")
    if k > MAX_K:
        raise ImageSearchError(f"{k_} = {k}; ask for at most {MAX_K} neighbours.")
    if k > n_index:
        where = f": {index} holds {n_index} images" if index else ""
        more = f" {fix}" if fix else ""
        raise ImageSearchError(  # the check's own terms, as scikit-learn words it; then the fix
            f"Expected k <= n_index, but n_index = {n_index}, k = {k}{where}; lower {k_}{more}."
        )
    return k
