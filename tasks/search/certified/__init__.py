"""Exact k-nearest-neighbour search at reduced-precision speed, with a proof per query.

A cheap pass scores every (query, index row) pair with a matrix product in a reduced format
(int8, float16 or bfloat16, or float32 where nothing faster runs); a worst-case bound on that
pass's error picks, per query, every row that *could* be among the ``k`` nearest; float32 dot
products with their own proven bound drop the candidates already beyond the k-th, and the rest
are measured in float64 (``tasks.search.core``). The answer is the exact top-``k`` with the tie
rule of ``tasks.search.exact`` (equal distances: lower position first). A query whose
certificate does not hold falls back to the exact path; the fraction is reported.

The bound and its proof: docs/certified.md. Modules: ``formats`` (rows to int8/float16/
bfloat16 with per-row scales), ``engines`` (NumPy, onnxruntime int8, CuPy cuBLAS: the last not
yet run on a GPU), ``choice`` (format by measured rate), ``bound`` (the error bound), ``index``
(prepare) and ``search``.

For one query or a few against a large index (the query command, the HTTP service), prepare
once with :func:`prepare_certified` (a memory-mapped float32 array is kept, not copied) and
call :func:`search_certified` per request with a (1, d) or (m, d) array: one block, finished
in the calling thread for a single query.
"""

from tasks.search.certified.choice import FormatChoice, choose_format
from tasks.search.certified.formats import FORMATS
from tasks.search.certified.index import CertifiedIndex, prepare_certified
from tasks.search.certified.search import CertifiedStats, search_certified

__all__ = [
    "FORMATS",
    "CertifiedIndex",
    "CertifiedStats",
    "FormatChoice",
    "choose_format",
    "prepare_certified",
    "search_certified",
]
