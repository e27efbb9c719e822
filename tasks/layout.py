"""The output folder's layout: every name the product gives a file or folder inside ``--out``,
the stages that write them, and the set a finished run commits. The one place these names live;
readers (the query core, the service, the report) and writers (the stages) both go through it.

Paths are relative to the output folder, so a copied or re-mounted folder answers from its own
files. Nothing here touches the disk.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Bookkeeping: names that only the product writes.
TEMP_PREFIX = ".image-search-tmp."  # every temporary file the product writes starts with this
LOCK_FILE = ".image-search.lock"
STATE_DIR = ".state"  # one record per stage: its key and the SHA-256 of its outputs
STAGING_DIR = ".staging"  # a run's new outputs until it commits them as one set
JOURNAL = ".commit.json"  # the stages a commit is moving, so a killed commit is finished
EMBEDDINGS_DIR = ".embeddings"  # the content-addressed embedding store, one folder per model
FEATURES_DIR = "features"
KNN_DIR = ".knn"

# The outputs a person reads.
CATALOG_FILE = "catalog.parquet"
ERRORS_FILE = "errors.parquet"
SAMPLES_FILE = "samples.png"
SPLIT_FILE = "split.parquet"
INDEX_FEATURES = f"{FEATURES_DIR}/index.parquet"
# Copies of the index features for the query path, beside the Parquet file of record: the
# embeddings as one (n, 2048) float32 matrix that readers memory-map, and per row the image id
# and the half squared norm the exact search ranks with.
INDEX_MATRIX = f"{FEATURES_DIR}/index.npy"
INDEX_ROWS = f"{FEATURES_DIR}/index-rows.npy"
# The compact copy that exact single queries scan (certified search, docs/certified.md): the
# index's rows in int8, laid out as the int8 engine reads them (2048 x n), and per row the
# terms of the certified bound; a quarter of the bytes of the float32 copy.
INDEX_COMPACT = f"{FEATURES_DIR}/index-int8.npy"
INDEX_COMPACT_ROWS = f"{FEATURES_DIR}/index-int8-rows.npy"
# The approximate index (opt-in: the run's ann parameter) and what its build measured, among
# it the recall@10 of its answers against exact search on the run's own images.
ANN_INDEX = f"{FEATURES_DIR}/ann.faiss"
ANN_INFO = f"{FEATURES_DIR}/ann.json"
# The index's model, exported once, that embeds queries without building it again.
QUERY_MODEL = f"{FEATURES_DIR}/model.onnx"
QUERY_FEATURES = f"{FEATURES_DIR}/query.parquet"
NEIGHBORS_FILE = "neighbors.parquet"
COMPARE_FILE = "compare.json"
DUPLICATES_FILE = "duplicates.parquet"
GALLERY_FILE = "duplicates.png"
QUALITY_FILE = "quality.json"
RESULTS_FILE = "results.png"
REPORT_FILE = "report.html"  # the run's report, self-contained: opens offline, after the run

# Sub-folders of the output folder that hold only files this product writes.
OUTPUT_SUBDIRS = frozenset({FEATURES_DIR, KNN_DIR, STATE_DIR})


@dataclass(frozen=True)
class StageLayout:
    """A stage's name (its record is ``.state/<name>.json``) and the outputs it writes."""

    name: str
    outputs: tuple[str, ...]

    @property
    def record(self) -> str:
        return record_of(self.name)

    def with_outputs(self, outputs: Iterable[str]) -> StageLayout:
        """The same stage writing a subset of its outputs (one that depends on the data)."""
        chosen = tuple(outputs)
        unknown = set(chosen) - set(self.outputs)
        if unknown:
            raise ValueError(f"stage {self.name} does not write {sorted(unknown)}")
        return StageLayout(self.name, chosen)


CATALOG = StageLayout("catalog", (CATALOG_FILE, ERRORS_FILE))
SAMPLES = StageLayout("samples", (SAMPLES_FILE,))
SPLIT = StageLayout("split", (SPLIT_FILE,))
EMBED = StageLayout("embed", (INDEX_FEATURES, QUERY_FEATURES))
INDEX_COPY = StageLayout("index-copy", (INDEX_MATRIX, INDEX_ROWS))
INDEX_COMPACT_STAGE = StageLayout("index-compact", (INDEX_COMPACT, INDEX_COMPACT_ROWS))
ANN = StageLayout("ann", (ANN_INDEX, ANN_INFO))
QUERY_MODEL_STAGE = StageLayout("query-model", (QUERY_MODEL,))
COMPARE = StageLayout("compare", (COMPARE_FILE, NEIGHBORS_FILE))
EVALUATE = StageLayout("evaluate", (DUPLICATES_FILE, GALLERY_FILE, QUALITY_FILE))
RESULTS = StageLayout("results", (RESULTS_FILE,))
REPORT = StageLayout("report", (REPORT_FILE,))


def knn_stage(backend: str) -> StageLayout:
    """The search stage of one backend: its neighbours as image ids."""
    return StageLayout(f"knn-{backend}", (f"{KNN_DIR}/{backend}.npz",))


def record_of(stage: str) -> str:
    """Where stage ``stage`` records what it wrote."""
    return f"{STATE_DIR}/{stage}.json"


def run_stages(backends: Iterable[str]) -> list[str]:
    """Every stage of one batch run, in order: the set it commits when it has finished."""
    before = [
        *(CATALOG, SAMPLES, SPLIT, EMBED),
        *(INDEX_COPY, INDEX_COMPACT_STAGE, ANN, QUERY_MODEL_STAGE),
    ]
    after = [COMPARE, EVALUATE, RESULTS, REPORT]
    return (
        [s.name for s in before] + [knn_stage(b).name for b in backends] + [s.name for s in after]
    )


# What a finished run hands back, by name: the files and folders a person opens; the report last,
# so that it is the last line the command line prints.
RUN_OUTPUTS: dict[str, str] = {
    "catalog": CATALOG_FILE,
    "errors": ERRORS_FILE,
    "samples": SAMPLES_FILE,
    "split": SPLIT_FILE,
    "features": FEATURES_DIR,
    "neighbors": NEIGHBORS_FILE,
    "compare": COMPARE_FILE,
    "results": RESULTS_FILE,
    "duplicates": DUPLICATES_FILE,
    "gallery": GALLERY_FILE,
    "quality": QUALITY_FILE,
    "report": REPORT_FILE,
}

# An index, as the query core reads it: the features of the index side and the catalog that
# says where each image is, each with the record of the stage that wrote it; then what a run
# derives from them for fast answers, each read only when its record says it is derived from
# the files above (else the query core falls back to them and says so).
INDEX_FILES: dict[str, str] = {INDEX_FEATURES: EMBED.name, CATALOG_FILE: CATALOG.name}
INDEX_DERIVED: dict[str, str] = {
    INDEX_MATRIX: INDEX_COPY.name,
    INDEX_ROWS: INDEX_COPY.name,
    INDEX_COMPACT: INDEX_COMPACT_STAGE.name,
    INDEX_COMPACT_ROWS: INDEX_COMPACT_STAGE.name,
    ANN_INDEX: ANN.name,
    ANN_INFO: ANN.name,
    QUERY_MODEL: QUERY_MODEL_STAGE.name,
}
