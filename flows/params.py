"""The flow's parameters: one pydantic model, which is also the form of the Prefect UI and the
options of the ``image-search run`` command."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.search.backends import BACKEND_NAMES, BackendName
from tasks.sources.stl10 import OFFICIAL_URL

__all__ = ["BACKEND_NAMES", "OFFICIAL_URL", "BackendName", "SearchParams"]


class SearchParams(BaseModel):
    """Everything a run of ``image-search`` can be told."""

    model_config = ConfigDict(extra="forbid", title="image-search parameters")

    source: str = Field(
        OFFICIAL_URL,
        description=(
            "Where the images come from: the official STL-10 URL (default), any http(s):// or "
            "file:// mirror of stl10_binary.tar.gz, a local tarball, a folder holding "
            "unlabeled_X.bin, or 'sample' for the built-in offline sample."
        ),
        min_length=1,
    )
    out: str = Field(
        "image-search-out",
        description=(
            "Output folder: samples.png, split.parquet, features/, neighbors.parquet, "
            "compare.json, results.png. Must outlive the run (a shared volume in Kubernetes)."
        ),
        min_length=1,
    )
    data_dir: str | None = Field(
        None,
        description=(
            "Data cache for downloaded and extracted files; default: $IMAGE_SEARCH_DATA, "
            "else the per-user cache folder."
        ),
    )
    limit: int | None = Field(
        None, ge=1, description="Use only the first N images (empty: all of them)."
    )
    seed: int = Field(0, ge=0, description="Seed of the index/query split and the picture grids.")
    split_ratio: float = Field(
        0.9,
        gt=0.0,
        lt=1.0,
        description="Fraction of the images that form the index; the rest query it.",
    )
    n_show: int = Field(32, ge=1, le=256, description="How many random images samples.png shows.")
    weights: str = Field(
        "imagenet",
        description=(
            "ResNet50 weights: 'imagenet' (Keras cache), a path to a .h5/.weights.h5 file, or "
            "'none' for random initialisation (features are then meaningless; reports say so)."
        ),
        min_length=1,
    )
    batch_size: int = Field(
        128,
        ge=1,
        le=4096,
        description="Images per forward pass of the embedding model (128: fastest on CPU).",
    )
    precision: Literal["float32", "bfloat16"] = Field(
        "float32",
        description=(
            "Arithmetic of the embedding model. 'bfloat16' is an opt-in speed-up on CPUs with "
            "AVX-512 BF16 and on recent GPUs; features differ slightly from float32 ones."
        ),
    )
    gpu_memory_fraction: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description=(
            "TensorFlow's share of GPU memory (e.g. 0.3 leaves room for cuML on the same GPU); "
            "empty: grow on demand."
        ),
    )
    backends: list[BackendName] | None = Field(
        None,
        description=(
            "KNN backends to run; 'sklearn' is always added as the reference. Empty: cuml on "
            "a GPU machine, faiss where no GPU is available."
        ),
    )
    k: int = Field(3, ge=1, le=1000, description="Neighbours per query.")
    tolerance: float = Field(
        1.0,
        gt=0.0,
        description="Largest absolute distance deviation from scikit-learn that still passes.",
    )
    n_results: int = Field(
        5,
        ge=1,
        le=20,
        description="How many random queries results.png shows with their neighbours.",
    )

    @field_validator("backends")
    @classmethod
    def _dedupe_backends(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            return None
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _check_weights(self) -> SearchParams:
        if self.weights.strip() == "":
            raise ValueError("weights must be 'imagenet', 'none' or a path to a weights file")
        return self
