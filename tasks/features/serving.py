"""The stages that make an index quick to ask, beside its files of record:

``index-copy``: the index features as a memory-mapped matrix and per-row ids and norms
(:mod:`tasks.ask.files`), made from ``features/index.parquet``, which stays the artifact of
record; ``index-compact``: the int8 copy that exact single queries scan (certified search,
:mod:`tasks.ask.compact`); ``ann``: the approximate index, when the run asks for one, with the
recall it measured (:mod:`tasks.search.ann`); ``query-model``: the index's model exported as
ONNX (:mod:`tasks.features.exported`), once per model, so that a query does not build
ResNet50 in TensorFlow.

Each records what it was made from, so that a reader uses it only while it matches. The two
that pass over every row at 10^6 images (compact, ann) read the copy a block at a time, show a
progress bar, and resume an interrupted pass from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from tasks.ask import compact
from tasks.ask.files import SOURCE_KEY, MatrixFile, features_digest, write_copy
from tasks.features import exported
from tasks.features.model import build_model
from tasks.layout import (
    ANN,
    ANN_INDEX,
    ANN_INFO,
    INDEX_COMPACT,
    INDEX_COMPACT_ROWS,
    INDEX_COMPACT_STAGE,
    INDEX_COPY,
    INDEX_FEATURES,
    INDEX_MATRIX,
    INDEX_ROWS,
    QUERY_MODEL,
)
from tasks.layout import QUERY_MODEL_STAGE as MODEL_STAGE
from tasks.search import ann as approximate
from tasks.search.ann import AnnMode, gpu
from tasks.storage import RunFolder, Stage, atomic_path, write_json_atomic
from tasks.types import Features, ModelSpec

log = logging.getLogger(__name__)

ANN_CHECKPOINT_ROWS = 131_072  # rows added between checkpoints of the approximate index


def _source(features: Features) -> tuple[Path, str]:
    """Where the features and their record are, and the digest of the features of record."""
    base = Path(features.index.uri).parent.parent
    digest = features_digest(base)
    if digest is None:
        raise RuntimeError(f"{features.index.uri} has no stage record")
    return base, digest


def _copy_stage(run: RunFolder, digest: str) -> Stage:
    return run.stage(INDEX_COPY, [digest], code=["tasks.ask.files"])


def _matrix(run: RunFolder, digest: str) -> Path:
    """The float32 copy that the derived stages read (in place or staged); it must be done."""
    stage = _copy_stage(run, digest)
    if stage.done() is None:
        raise RuntimeError("the memory-mapped copy of the features comes first")
    return stage.path(INDEX_MATRIX)


@dataclass
class Checkpoint:
    """How far an interrupted pass of a stage got, kept beside its staged outputs under the
    stage's key: a later run with the same key resumes there, any other starts afresh."""

    path: Path
    key: str

    def load(self) -> dict[str, Any]:
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return dict(saved.get("state") or {}) if saved.get("key") == self.key else {}

    def save(self, **state: Any) -> None:
        write_json_atomic(self.path, {"key": self.key, "state": state})

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _write_index(index: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        approximate.write_index(index, tmp)


def index_copy(features: Features, run: RunFolder) -> dict[str, Any]:
    """The memory-mapped copy of the index features, unless a run made it from the same file."""
    _, digest = _source(features)
    source = {INDEX_FEATURES: digest}
    stage = _copy_stage(run, digest)
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


def index_compact(features: Features, run: RunFolder, progress: bool = True) -> dict[str, Any]:
    """The int8 copy that certified search scans for exact answers (:mod:`tasks.ask.compact`),
    unless a run made it from the same features; resumes an interrupted pass."""
    _, digest = _source(features)
    stage = run.stage(
        INDEX_COMPACT_STAGE,
        [digest, compact.FORMAT],
        code=["tasks.ask.compact", "tasks.search.certified.formats"],
    )
    info = stage.done()
    if info is not None:
        return info
    started = time.perf_counter()
    matrix = _matrix(run, digest)
    values, rows = stage.path(INDEX_COMPACT), stage.path(INDEX_COMPACT_ROWS)
    values.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = Checkpoint(values.with_name(values.name + ".progress"), stage.key)
    state = checkpoint.load()
    n = len(MatrixFile(matrix))
    if "unsigned" not in state:
        state = {"unsigned": compact.non_negative(MatrixFile(matrix)), "rows": 0}
        checkpoint.save(**state)
    elif state["rows"]:
        log.info("resuming the int8 copy at row %d of %d", state["rows"], n)
    with tqdm(
        total=n, initial=state["rows"], unit="row", desc="int8 copy", disable=not progress
    ) as bar:

        def done(rows_done: int) -> None:
            bar.update(rows_done - bar.n)
            checkpoint.save(unsigned=state["unsigned"], rows=rows_done)

        zero_point = compact.write_compact(
            matrix, values, rows, unsigned=state["unsigned"], start=state["rows"], on_block=done
        )
    info = stage.finish(
        **{SOURCE_KEY: {INDEX_FEATURES: digest}},
        format=compact.FORMAT,
        zero_point=zero_point,
        rows=n,
    )
    checkpoint.clear()
    log.info("wrote the int8 copy of %d index rows in %.1f s", n, time.perf_counter() - started)
    return info


def ann_index(
    features: Features, run: RunFolder, mode: AnnMode, progress: bool = True, seed: int = 0
) -> dict[str, Any] | None:
    """The approximate index (:mod:`tasks.search.ann`) when ``mode`` asks for it (``auto``:
    from :data:`~tasks.search.ann.AUTO_ROWS` index images), with its recall@10 measured on the
    run's own images; None when none is built. Resumes an interrupted build from its last
    checkpoint."""
    _, digest = _source(features)
    n = features.index.rows
    if mode == "off" or (mode == "auto" and n < approximate.AUTO_ROWS):
        return None
    if n < approximate.MIN_ROWS:
        log.info(
            "no approximate index for %d images (from %d it can save time): exact answers only",
            n,
            approximate.MIN_ROWS,
        )
        return None
    stage = run.stage(ANN, [digest, approximate.TARGET, seed], code=["tasks.search.ann"])
    info = stage.done()
    if info is not None:
        return info
    started = time.perf_counter()
    rows = MatrixFile(_matrix(run, digest))
    n, dim = rows.shape
    target = stage.path(ANN_INDEX)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    checkpoint = Checkpoint(target.with_name(target.name + ".progress"), stage.key)
    tuning, measured, train_rows = approximate.sample_positions(n, seed)
    design = approximate.Design.of(n, dim, len(train_rows))
    state = checkpoint.load()
    if state and partial.is_file():
        index = approximate.read_index(partial)
        log.info("resuming the approximate index at row %d of %d", int(index.ntotal), n)
    else:
        log.info("training the approximate index (%s) on %d rows", design.factory, design.train)
        index = approximate.train(rows, design, train_rows, seed)
        _write_index(index, partial)
        checkpoint.save(rows=0)
    on_gpu = gpu.gpu_count() > 0  # FAISS's GPU build: rows added on the device
    filling = gpu.to_gpu(index) if on_gpu else index
    with tqdm(
        total=n, initial=int(index.ntotal), unit="row", desc="ann add", disable=not progress
    ) as bar:
        last = [int(index.ntotal)]

        def added(rows_done: int) -> None:
            bar.update(rows_done - bar.n)
            if rows_done - last[0] >= ANN_CHECKPOINT_ROWS and rows_done < n:
                _write_index(gpu.to_cpu(filling) if on_gpu else filling, partial)
                checkpoint.save(rows=rows_done)
                last[0] = rows_done

        approximate.add(filling, rows, int(index.ntotal), on_block=added)
    index = gpu.to_cpu(filling) if on_gpu else filling
    ann = approximate.AnnIndex(index, design, approximate.Probe(*approximate.LADDER[0]))
    approximate.tune(ann, rows, tuning, measured, seed=seed, on_step=log.info)
    ann.info = {
        "build_seconds": round(time.perf_counter() - started, 1),
        "device": "gpu" if on_gpu else "cpu",
    }
    _write_index(ann.index, target)
    write_json_atomic(stage.path(ANN_INFO), approximate.describe(ann))
    assert ann.recall is not None
    info = stage.finish(
        **{SOURCE_KEY: {INDEX_FEATURES: digest}},
        factory=design.factory,
        probe={"nprobe": ann.probe.nprobe, "rerank": ann.probe.rerank},
        recall_at_10=ann.recall.value,
        recall_queries=ann.recall.queries,
    )
    checkpoint.clear()
    partial.unlink(missing_ok=True)
    log.info(
        "built the approximate index of %d rows in %.1f s: recall@%d %.4f on %d of the run's "
        "images (nprobe %d, %d candidates re-ranked exactly)",
        n,
        time.perf_counter() - started,
        ann.recall.k,
        ann.recall.value,
        ann.recall.queries,
        ann.probe.nprobe,
        ann.probe.rerank,
    )
    if not ann.recall.met:
        log.warning(
            "the approximate index reaches recall@%d %.4f, below the target %.2f; its answers "
            "say so, and exact ones stay available",
            ann.recall.k,
            ann.recall.value,
            ann.recall.target,
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
def serving(features: Features, out: str, spec: ModelSpec, ann: AnnMode = "auto") -> dict[str, Any]:
    """Prefect task: the memory-mapped copy of the index features, its int8 copy, the
    approximate index when ``ann`` asks for one, and the exported model."""
    run = RunFolder(Path(out))
    return {
        "index_copy": index_copy(features, run),
        "index_compact": index_compact(features, run),
        "ann": ann_index(features, run, ann),
        "query_model": query_model(spec, run, str(features.model["model_key"])),
    }
