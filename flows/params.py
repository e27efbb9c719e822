"""The flow's parameters, declared once.

Each parameter is an ``Annotated`` type carrying its bounds and description. The flow's flat
signature (the Prefect UI form and a deployment's per-run ``--param``), the :class:`SearchParams`
model and the ``image-search run`` options all use these types, so they cannot drift apart.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tasks.errors import param
from tasks.search.ann import AUTO_ROWS, AnnMode
from tasks.search.backends import BACKEND_NAMES, BackendName
from tasks.search.k import K
from tasks.sources.stl10 import OFFICIAL_URL
from tasks.storage import overlap

__all__ = [
    "BACKEND_NAMES",
    "DEFAULTS",
    "OFFICIAL_URL",
    "BackendName",
    "K",
    "SearchParams",
    "format_validation_error",
    "overlap_message",
    "source_overlap_message",
]


def _param(description: str, **bounds: Any) -> Any:
    """The ``Field`` of one parameter type: bounds plus a description.

    Prefect's flow schema passes ``description=None`` over the annotation's own ``Field`` but
    merges ``json_schema_extra``, so the description travels there as well.
    """
    return Field(description=description, json_schema_extra={"description": description}, **bounds)


def _none_word(value: Any) -> Any:
    """'none' or empty, as typed on a command line, means None (the default) for an optional
    parameter; also as the only item of a list."""
    if isinstance(value, str) and value.strip().lower() in ("", "none"):
        return None
    if isinstance(value, list) and len(value) == 1 and _none_word(value[0]) is None:
        return None
    return value


NoneWord = BeforeValidator(_none_word)

Source = Annotated[
    str,
    _param(
        "Where the images come from. Your own images: a folder (searched recursively; "
        "s3:// and gs:// folders too), a tar/zip archive, or a .parquet/.csv list of paths or "
        "URLs. STL-10: the official URL (default), any http(s):// or file:// mirror of "
        "stl10_binary.tar.gz, a local tarball, a folder holding unlabeled_X.bin, or 'sample' "
        "for the built-in offline sample.",
        min_length=1,
    ),
]
Out = Annotated[
    str,
    _param(
        "Output folder: report.html (the run's report), catalog.parquet, samples.png, "
        "split.parquet, features/, neighbors.parquet, compare.json, results.png. Must outlive "
        "the run (a shared volume in Kubernetes).",
        min_length=1,
    ),
]
DataDir = Annotated[
    str | None,
    _param(
        "Data cache for downloaded and extracted files, apart from the output folder; "
        "none: $IMAGE_SEARCH_DATA, else the per-user cache folder."
    ),
    NoneWord,
]
Limit = Annotated[
    int | None, _param("Use only the first N images (none: all of them).", ge=1), NoneWord
]
Seed = Annotated[
    int, _param("Seed of the index/query split, the query sample and the picture grids.", ge=0)
]
SplitRatio = Annotated[
    float,
    _param(
        "STL-10 sources only: fraction of the images that form the index; the rest query it. "
        "Your own collections put every image in the index (see n_queries).",
        gt=0,
        lt=1,
    ),
]
NQueries = Annotated[
    int,
    _param(
        "Your own collections only (every image is in the index): how many index images, a "
        "seeded sample, are searched to compare the backends and measure quality, each left "
        "out of its own answer (leave-one-out); every image when the collection holds fewer.",
        ge=1,
    ),
]
NShow = Annotated[int, _param("How many random images samples.png shows.", ge=1, le=256)]
Weights = Annotated[
    str,
    _param(
        "ResNet50 weights: 'imagenet' (Keras cache), a path to a .h5/.weights.h5 file, or "
        "'none' for random initialisation (features are then meaningless; reports say so).",
        min_length=1,
    ),
]
BatchSize = Annotated[
    int,
    _param("Images per forward pass of the embedding model (128: fastest on CPU).", ge=1, le=4096),
]
Precision = Annotated[
    Literal["float32", "bfloat16"],
    _param(
        "Arithmetic of the embedding model. 'bfloat16' is an opt-in speed-up on CPUs with "
        "AVX-512 BF16 and on recent GPUs; features differ slightly from float32 ones."
    ),
]
GpuMemoryFraction = Annotated[
    float | None,
    _param(
        "TensorFlow's share of GPU memory (e.g. 0.3 leaves room for cuML on the same GPU); "
        "none: grow on demand.",
        gt=0,
        le=1,
    ),
    NoneWord,
]
Backends = Annotated[
    list[BackendName] | None,
    _param(
        "KNN backends to run (on the command line comma-separated); 'sklearn' is always added "
        "as the reference. None: cuml on a GPU machine, faiss where no GPU is available."
    ),
    NoneWord,
]
Stl10Set = Annotated[
    Literal["unlabeled", "labelled"],
    _param(
        "STL-10 sources only: 'unlabeled' indexes the 100,000 unlabeled images (split seeded); "
        "'labelled' indexes the 5,000 labelled training images, queries with the 8,000 test "
        "images and measures retrieval quality by class."
    ),
]
InputSize = Annotated[
    int,
    _param(
        "Model input size in pixels: images are resized (short side) and centre-cropped to "
        "this square. 96 matches STL-10; 224 suits photos.",
        ge=32,
        le=1024,
    ),
]
MaxErrorRate = Annotated[
    float,
    _param(
        "Largest share of images that may fail to load (listed in errors.parquet) before the "
        "run stops.",
        ge=0,
        le=1,
    ),
]
Cluster = Annotated[
    str | None,
    _param(
        "Where the sharded work runs: none (this process, the default), local:N (a Dask "
        "LocalCluster of N workers), tcp://HOST:PORT (a running Dask scheduler) or kubernetes "
        "(Dask worker pods on the GPU node). When set, embedding is sharded over the workers "
        "and the 'sharded' exact search runs and is compared like the other backends."
    ),
    NoneWord,
]
Ann = Annotated[
    AnnMode,
    _param(
        "The approximate index, for fast answers from large indexes: 'on' builds one (IVF-PQ "
        "whose candidates are re-ranked exactly; its recall@10 against exact search is "
        "measured on the run's own images and shown with every answer it gives), 'off' none, "
        f"'auto' from {AUTO_ROWS:,} index images. A query may always ask for exact answers."
    ),
]
Tolerance = Annotated[
    float, _param("Largest absolute distance deviation from scikit-learn that still passes.", gt=0)
]
NResults = Annotated[
    int, _param("How many random queries results.png shows with their neighbours.", ge=1, le=20)
]


def source_overlap_message(source: str, out: str | Path) -> str | None:
    """Why a local source folder and the output folder cannot be used together, or None.

    The output folder may lie inside the source (the listing leaves it out), but never be the
    source or hold it: the run would index its own pictures (samples.png, results.png...) from
    its second run on, and its clean-up works in folders that would hold the user's photos.
    """
    if "://" in source and not source.startswith("file://"):
        return None
    path = Path(source.removeprefix("file://")).expanduser()
    if not path.is_dir() and path.resolve() != Path(out).expanduser().resolve():
        return None  # a list, an archive, a .bin, 'sample', or nothing at all
    a, b = Path(out).expanduser().resolve(), path.resolve()
    how = overlap(a, b)
    if how is None or how == "lies inside":
        return None
    return (
        f"The output folder {a} ({param('out')}) {how} the source folder {b} "
        f"({param('source')}): a run would index its own outputs. Choose an output folder "
        f"outside the source, or a new folder inside it (the listing leaves that one out)."
    )


class SearchParams(BaseModel):
    """Everything a run of ``image-search`` can be told, checked as a whole."""

    model_config = ConfigDict(extra="forbid", title="image-search parameters")

    source: Source = OFFICIAL_URL
    stl10_set: Stl10Set = "unlabeled"
    out: Out = "image-search-out"
    data_dir: DataDir = None
    limit: Limit = None
    seed: Seed = 0
    split_ratio: SplitRatio = 0.9
    n_queries: NQueries = 2000
    n_show: NShow = 32
    weights: Weights = "imagenet"
    batch_size: BatchSize = 128
    precision: Precision = "float32"
    input_size: InputSize = 96
    max_error_rate: MaxErrorRate = 0.05
    gpu_memory_fraction: GpuMemoryFraction = None
    backends: Backends = None
    cluster: Cluster = None
    ann: Ann = "auto"
    k: K = 3
    tolerance: Tolerance = 1.0
    n_results: NResults = 5

    @field_validator("backends")
    @classmethod
    def _dedupe_backends(cls, value: list[str] | None) -> list[str] | None:
        return list(dict.fromkeys(value)) if value else None

    @field_validator("cluster")
    @classmethod
    def _check_cluster(cls, value: str | None) -> str | None:
        from tasks.cluster_setting import parse_cluster
        from tasks.errors import ImageSearchError

        try:
            parse_cluster(value)
        except ImageSearchError as exc:
            raise ValueError(exc.args[0]) from exc  # the message as written: the edge words it
        return value

    @model_validator(mode="after")
    def _check(self) -> SearchParams:
        if self.weights.strip() == "":
            raise ValueError(
                f"{param('weights')} must be 'imagenet', 'none' or a path to a weights file"
            )
        if self.data_dir is not None and (clash := overlap_message(self.out, self.data_dir)):
            raise ValueError(clash)
        if clash := source_overlap_message(self.source, self.out):
            raise ValueError(clash)
        return self


# The defaults of every parameter; the flow's signature reads its defaults from here.
DEFAULTS = SearchParams()


def overlap_message(out: str | Path, data_dir: str | Path) -> str | None:
    """Why ``out`` and ``data_dir`` cannot be used together, or None when they are apart.

    The output folder and the data cache each take a lock and clean up their own temporary
    files; one inside the other would make a run wait on itself.
    """
    a, b = (Path(p).expanduser().resolve() for p in (out, data_dir))
    how = overlap(a, b)
    if how is None:
        return None
    return (
        f"The output folder {a} ({param('out')}) {how} the data cache {b} ({param('data_dir')}); "
        f"choose two separate folders."
    )


def _shown(value: Any) -> str:
    return shlex.quote(value) if isinstance(value, str) else repr(value)


def format_validation_error(exc: ValidationError) -> str:
    """One line per bad parameter: its name (a :func:`~tasks.errors.param`, for the edge to
    word), the value given and what is allowed."""
    lines = []
    for err in exc.errors(include_url=False):
        message = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
        names = [p for p in err["loc"] if isinstance(p, str) and p in SearchParams.model_fields]
        if names:
            message = f"{param(names[-1])} = {_shown(err.get('input'))}: {message}"
        lines.append(message)
    return "invalid parameters:\n  " + "\n  ".join(lines)
