"""The small records the stages hand each other: references to data on disk (never the data) and
the description of the model that embeds. Kept apart from the stages that make them, so that a
reader (search, compare, report, the query core, the service) imports a record, not a stage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class DataRef(BaseModel):
    """A small, serialisable reference to data on disk, passed between tasks instead of arrays."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str
    rows: int
    fingerprint: str

    @property
    def path(self) -> Path:
        return Path(self.uri)


class CatalogRef(DataRef):
    """Reference to ``catalog.parquet``: ``rows`` usable images, plus what the pass did."""

    n_errors: int = 0
    labelled: bool = False
    stats: dict[str, int] = Field(default_factory=dict)


class SplitRef(DataRef):
    """Reference to ``split.parquet`` with the size of each side."""

    n_index: int
    n_query: int


@dataclass(frozen=True)
class Features:
    """References to both feature files and what produced them."""

    index: DataRef
    query: DataRef
    model: dict[str, Any]
    device: str


@dataclass(frozen=True)
class ModelSpec:
    """What decides an embedding: weights, seed (random weights), arithmetic, input size."""

    weights: str
    seed: int = 0
    precision: str = "float32"
    input_size: int = 96
    gpu_memory_fraction: float | None = None

    def key(self) -> str:
        """The embedding store's key for this model (weights by content)."""
        from tasks.features.content import model_key
        from tasks.features.model import weights_identity

        return model_key(weights_identity(self.weights), self.seed, self.precision, self.input_size)
