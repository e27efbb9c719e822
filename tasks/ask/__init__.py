"""The query core: ask an index for the nearest images of query images. Used alike by the
``image-search query`` command, the ``image-search-query`` flow and the HTTP service; imports
neither Prefect nor TensorFlow (TensorFlow loads only when a model must be built).

An index is the output folder of a finished ``image-search run``. The steps, each a function:

- :func:`open_index` reads the folder's files as one committed set (:mod:`tasks.ask.files`):
  the features (a memory-mapped copy, or the Parquet file of record), the catalog, the model's
  metadata, and the exported model when the folder holds a current one;
- :func:`model_spec` checks that this installation reproduces the model that built the index;
- :func:`load_forward` gives its forward pass (the exported model, else TensorFlow);
- :func:`query_sources` turns the user's arguments into pending answers, :func:`ask` answers
  them, :func:`search` finds the neighbours of embeddings; ``k`` is checked by
  :func:`tasks.search.k.check_k` (bound :data:`tasks.search.k.MAX_K`);
- tiers: an index whose run built an approximate index answers from it unless a query asks
  for exact (``exact=True``); exact answers come from the certified scan of the int8 copy
  (same answer as the float32 scan, a quarter of the bytes), else the float32 rows; each
  answer's :class:`Tier` says which, and for approximate ones the recall@10 measured when the
  index was built (:func:`tier`).

Presentation (tables, JSON rows, pictures) lives at the edges: ``tasks.report.answers``.

A new file of an index (a compact copy, an approximate index) is declared in
``tasks.layout.INDEX_DERIVED`` with the stage that writes it; its stage records what it was made
from (``files.SOURCE_KEY``), :func:`tasks.ask.files.derived_problem` says whether it is
current, and :func:`tasks.ask.index._load` opens it into a field of :class:`Index`.
"""

from tasks.ask.embedding import MODEL, Forward, lazy, load_forward, model_spec
from tasks.ask.files import index_identity
from tasks.ask.index import THUMB, Index, how_to_build, open_index
from tasks.ask.search import Answer, Neighbour, Tier, ask, index_k, query_sources, search, tier

__all__ = [
    "MODEL",
    "THUMB",
    "Answer",
    "Forward",
    "Index",
    "Neighbour",
    "Tier",
    "ask",
    "how_to_build",
    "index_identity",
    "index_k",
    "lazy",
    "load_forward",
    "model_spec",
    "open_index",
    "query_sources",
    "search",
    "tier",
]
