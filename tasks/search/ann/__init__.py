"""Approximate nearest neighbours, opt-in, with their recall on the record.

An IVF-PQ index (FAISS: a PCA to at most 256 dimensions, an inverted file of ``nlist`` lists,
product-quantised codes of 4 dimensions a byte) proposes ``rerank`` candidates per query from
``nprobe`` lists; the candidates are measured exactly (float64, from the float32 rows: the
exact core's ``measure``) and the first k by (distance, position) are the answer. So every
distance returned is the true one, and what can be wrong is only which rows are returned: a true
neighbour the lists did not propose is missing.

How often that happens is measured when the index is built, on the run's own images: a seeded
sample of index rows, each asked for its neighbours with itself left out, against the exact
answer (leave-one-out; a returned row counts as right when its distance is at most the exact
k-th distance, so ties and duplicates are not counted as misses). A first, disjoint sample
picks the cheapest search setting that reaches the target; the second sample, not used for
that choice, measures the recall that is stored and shown with every answer.

Modules: ``index`` (the design, the search with its exact re-rank, the files), ``build`` (the
sample, PCA, training, adding a block at a time: memory is one block, the training sample and
the codes), ``recall`` (the exact answers of the sample, the recall, the choice of setting) and
``gpu`` (training and adding on a GPU with FAISS's GPU index, imported lazily; the same file
comes out; not yet run on a GPU). FAISS itself is imported only when an index is built or read.
"""

from tasks.search.ann.build import Rows, add, pca, sample_positions, train
from tasks.search.ann.index import (
    AUTO_ROWS,
    MIN_ROWS,
    RECALL_K,
    TARGET,
    AnnIndex,
    AnnMode,
    Design,
    Probe,
    Recall,
    describe,
    load,
    read_index,
    rerank,
    threads,
    write_index,
)
from tasks.search.ann.recall import LADDER, exact_neighbours, recall_of, tune

__all__ = [
    "AUTO_ROWS",
    "LADDER",
    "MIN_ROWS",
    "RECALL_K",
    "TARGET",
    "AnnIndex",
    "AnnMode",
    "Design",
    "Probe",
    "Recall",
    "Rows",
    "add",
    "describe",
    "exact_neighbours",
    "load",
    "pca",
    "read_index",
    "recall_of",
    "rerank",
    "sample_positions",
    "threads",
    "train",
    "tune",
    "write_index",
]
