"""The stages that make an index quick to ask, beside its files of record:

``index-copy``: the index features as a memory-mapped matrix and per-row ids and norms
(:mod:`tasks.ask.files`), made from ``features/index.parquet``, which stays the artifact of
record; ``query-model``: the index's model exported as ONNX (:mod:`tasks.features.exported`),
once per model, so that a query does not build ResNet50 in TensorFlow.

Each records what it was made from, so that a reader uses it only while it matches.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.ask.files import SOURCE_KEY, features_digest, write_copy
from tasks.features import exported
from tasks.features.model import build_model
from tasks.layout import INDEX_COPY, INDEX_FEATURES, INDEX_MATRIX, INDEX_ROWS, QUERY_MODEL
from tasks.layout import QUERY_MODEL_STAGE as MODEL_STAGE
from tasks.storage import RunFolder, atomic_path
from tasks.types import Features, ModelSpec

log = logging.getLogger(__name__)


def index_copy(features: Features, run: RunFolder) -> dict[str, Any]:
    """The memory-mapped copy of the index features, unless a run made it from the same file."""
    base = Path(features.index.uri).parent.parent  # where the features and their record are
    digest = features_digest(base)
    if digest is None:
        raise RuntimeError(f"{features.index.uri} has no stage record")
    source = {INDEX_FEATURES: digest}
    stage = run.stage(INDEX_COPY, [digest], code=["tasks.ask.files"])
    info = stage.done()
    if info is None:
        started = time.perf_counter()
        rows = write_copy(
            Path(features.index.uri), stage.path(INDEX_MATRIX), stage.path(INDEX_ROWS)
        )
        info = stage.finish(**{SOURCE_KEY: source, "rows": rows})
        log.info(
            "wrote the memory-mapped copy of %d index features in %.1f s",
            rows,
            time.perf_counter() - started,
        )
    return info


def query_model(spec: ModelSpec, run: RunFolder, model_key: str) -> dict[str, Any] | None:
    """The index's model exported as ONNX, unless a run exported the same model already; None
    for a precision the exported model does not reproduce (queries then build the model)."""
    if spec.precision != "float32":
        log.info("no exported model for %s features: queries build the model", spec.precision)
        return None
    stage = run.stage(MODEL_STAGE, [model_key], code=["tasks.features.exported"])
    info = stage.done()
    if info is None:
        started = time.perf_counter()
        model, _ = build_model(spec.weights, spec.seed, spec.precision)
        with atomic_path(stage.path(QUERY_MODEL)) as tmp:
            exported.export(model, tmp)
        info = stage.finish(**{SOURCE_KEY: {"model_key": model_key}})
        log.info("exported the model for queries in %.1f s", time.perf_counter() - started)
    return info


@task(cache_policy=NO_CACHE)
def serving(features: Features, out: str, spec: ModelSpec) -> dict[str, Any]:
    """Prefect task: the memory-mapped copy of the index features and the exported model."""
    run = RunFolder(Path(out))
    return {
        "index_copy": index_copy(features, run),
        "query_model": query_model(spec, run, str(features.model["model_key"])),
    }
