"""ResNet50 features: Parquet schema and metadata, resume after interruption, weights errors."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest

import tasks.catalog as catalog_mod
import tasks.features.embed as embed_mod
from tasks.errors import ImageSearchError, option_name
from tasks.features.content import EmbeddingStore
from tasks.features.embed import assemble_features, catalog_collection
from tasks.features.model import (
    DIM,
    build_model,
    keras_weights_path,
    make_forward,
    weights_identity,
)
from tasks.features.store import load_features, read_metadata
from tasks.sources.collection import Stl10Collection
from tasks.sources.sample import to_stl10_bytes
from tasks.split import split_dataset
from tasks.storage import RunFolder
from tasks.types import CatalogRef, ModelSpec, SplitRef
from tests.conftest import pattern_images

SPEC = ModelSpec("none", seed=0, precision="float32", input_size=96)


@pytest.fixture(scope="module")
def forward(random_resnet: Any) -> Callable[[np.ndarray], np.ndarray]:
    return make_forward(random_resnet[0])


def fake_forward(calls: list[int]) -> Callable[[np.ndarray], np.ndarray]:
    """A stand-in model for streaming tests: features derived from the pixels, calls counted."""

    def run(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        means = batch.reshape(len(batch), -1)[:, :DIM].astype(np.float32)
        return means

    return run


def test_forward_shapes_and_preprocessing(forward: Callable[[np.ndarray], np.ndarray]) -> None:
    images = pattern_images(5)
    out = forward(images)
    assert out.shape == (5, DIM) and out.dtype == np.float32
    assert np.all(out >= 0)  # max pooling over ReLU outputs
    # Batching does not change an image's features (beyond float noise).
    np.testing.assert_allclose(forward(images[:2]), out[:2], rtol=1e-4, atol=1e-4)


@pytest.fixture
def small_run(tmp_path: Path, reuse_random_resnet: None) -> tuple[CatalogRef, SplitRef, RunFolder]:
    """30 generated images catalogued (and embedded), split 24/6, both committed."""
    data = tmp_path / "imgs.bin"
    data.write_bytes(to_stl10_bytes(pattern_images(30)))
    run = RunFolder(tmp_path / "out")
    cat = catalog_collection(Stl10Collection(str(data)), run, SPEC, batch_size=8, progress=False)
    split_dataset(cat, run, 0.8, seed=0)
    run.commit(["catalog", "split"])
    cat = catalog_collection(Stl10Collection(str(data)), run, SPEC, batch_size=8, progress=False)
    return cat, split_dataset(cat, run, 0.8, seed=0), run


def test_features_files_load_everywhere(
    small_run: tuple[CatalogRef, SplitRef, RunFolder],
) -> None:
    cat, split, run = small_run
    assert cat.stats["embedded"] == 0 and cat.stats["listed"] == 30  # the committed catalog
    feats = assemble_features(cat, split, run, SPEC)
    assert feats.index.uri == str(run.staging / "features" / "index.parquet")
    assert run.commit(["embed"]) == ["embed"]
    index_path = run.out / "features" / "index.parquet"
    assert feats.index.rows == 24 and feats.query.rows == 6
    schema = pq.read_schema(index_path)
    assert str(schema.field("image_id").type) == "int64"
    assert str(schema.field("embedding").type) == "fixed_size_list<element: float>[2048]"
    meta = read_metadata(index_path)
    assert meta["model"] == "keras.applications.ResNet50" and meta["pooling"] == "max"
    assert meta["weights"] == "none" and meta["random_init"] is True
    assert "NOT meaningful" in meta["weights_detail"]
    assert meta["preprocessing"].startswith("keras.applications.resnet50.preprocess_input")
    assert meta["input_shape"] == [96, 96, 3] and meta["input_size"] == 96
    assert meta["model_key"] == SPEC.key() and meta["source_fingerprint"] == cat.fingerprint
    assert meta["tensorflow"] and meta["keras"] and meta["split"] == "index"
    ids, emb = load_features(index_path)
    assert emb.shape == (24, DIM) and emb.dtype == np.float32
    # The same file through pandas, DuckDB and Polars.
    frame = pd.read_parquet(index_path)
    assert frame["image_id"].tolist() == ids.tolist()
    np.testing.assert_array_equal(np.stack(frame["embedding"].to_numpy()), emb)
    n, width = duckdb.sql(f"select count(*), max(len(embedding)) from '{index_path}'").fetchall()[0]
    assert (n, width) == (24, DIM)
    pl_frame = pl.read_parquet(index_path)
    assert pl_frame.height == 24
    np.testing.assert_array_equal(pl_frame["embedding"].to_numpy()[3], emb[3])
    # A rerun with the same inputs writes nothing.
    mtime = index_path.stat().st_mtime_ns
    again = assemble_features(cat, split, run, SPEC)
    assert again.device == "cached" and index_path.stat().st_mtime_ns == mtime
    assert again.index.uri == str(index_path) and again.index.fingerprint == feats.index.fingerprint


def test_store_rows_equal_a_direct_forward_pass(
    small_run: tuple[CatalogRef, SplitRef, RunFolder], forward: Any
) -> None:
    cat, split, run = small_run
    assemble_features(cat, split, run, SPEC)
    run.commit(["embed"])
    ids, emb = load_features(run.out / "features" / "query.parquet")
    want = forward(pattern_images(30)[ids])
    np.testing.assert_allclose(emb, want, rtol=1e-4, atol=1e-4)


def test_damaged_features_are_rebuilt_never_trusted(
    small_run: tuple[CatalogRef, SplitRef, RunFolder],
) -> None:
    cat, split, run = small_run
    first = assemble_features(cat, split, run, SPEC)
    run.commit(["embed"])
    index_path = run.out / "features" / "index.parquet"
    _, good = load_features(index_path)
    # One embedding overwritten in place, same size: the page checksum and the stage record
    # both catch it.
    raw = bytearray(index_path.read_bytes())
    at = raw.index(good[3].tobytes()[:64])
    raw[at : at + 8] = b"\x00" * 8
    index_path.write_bytes(bytes(raw))
    with pytest.raises(ImageSearchError, match="is damaged"):
        load_features(index_path)
    again = assemble_features(cat, split, run, SPEC)
    assert again.device != "cached"  # rebuilt from the store, not trusted
    assert again.index.fingerprint == first.index.fingerprint
    run.commit(["embed"])
    np.testing.assert_array_equal(load_features(index_path)[1], good)
    # Truncated: rebuilt as well, not called foreign.
    index_path.write_bytes(index_path.read_bytes()[:1000])
    assemble_features(cat, split, run, SPEC)
    run.commit(["embed"])
    np.testing.assert_array_equal(load_features(index_path)[1], good)


def test_a_replaced_weights_file_changes_the_key(tmp_path: Path) -> None:
    path = tmp_path / "w.h5"
    path.write_bytes(b"first weights")
    first = weights_identity(str(path))
    stat = path.stat()
    path.write_bytes(b"other weights")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the same mtime
    assert weights_identity(str(path)) != first
    assert weights_identity("none") == "none"


def test_a_killed_catalog_pass_resumes_without_embedding_a_part_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catalog_mod, "PART_ROWS", 10)
    data = tmp_path / "imgs.bin"
    data.write_bytes(to_stl10_bytes(pattern_images(35)))
    calls: list[int] = []

    class Killed(Exception):
        pass

    def dying(batch: np.ndarray) -> np.ndarray:
        if sum(calls) >= 20:  # dies inside the third part
            raise Killed
        return fake_forward(calls)(batch)

    run = RunFolder(tmp_path / "out")
    monkeypatch.setattr(embed_mod, "forward_factory", lambda spec, meta: lambda: dying)
    with pytest.raises(Killed):
        catalog_collection(Stl10Collection(str(data)), run, SPEC, batch_size=5, progress=False)
    assert len(EmbeddingStore(run.out, SPEC.key()).parts()) == 2  # 20 images kept
    resumed: list[int] = []
    monkeypatch.setattr(
        embed_mod, "forward_factory", lambda spec, meta: lambda: fake_forward(resumed)
    )
    cat = catalog_collection(Stl10Collection(str(data)), run, SPEC, batch_size=5, progress=False)
    assert sum(resumed) == 15 and cat.stats["embedded"] == 15  # only the missing 15
    store = EmbeddingStore(run.out, SPEC.key())
    digests = [hashlib.sha256(to_stl10_bytes(im[None])).digest() for im in pattern_images(35)]
    clean: list[int] = []
    np.testing.assert_array_equal(store.gather(digests), fake_forward(clean)(pattern_images(35)))


def test_imagenet_weights_missing_says_where_to_put_them() -> None:
    with pytest.raises(ImageSearchError) as info:
        build_model("imagenet")
    text = info.value.worded(option_name)
    assert str(keras_weights_path()) in text
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in text
    assert "--weights none" in text


def test_weights_path_missing_or_wrong_architecture(tmp_path: Path) -> None:
    with pytest.raises(ImageSearchError, match=r"weights = '.*nope.h5': no such file"):
        build_model(str(tmp_path / "nope.h5"))
    import keras

    small = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = tmp_path / "small.weights.h5"
    small.save_weights(str(path))
    with pytest.raises(ImageSearchError, match="does not fit ResNet50"):
        build_model(str(path))


@pytest.mark.slow
def test_weights_file_round_trip(tmp_path: Path, forward: Any, random_resnet: Any) -> None:
    model, _ = random_resnet
    path = tmp_path / "resnet.weights.h5"
    model.save_weights(str(path))
    loaded, info = build_model(str(path))
    assert info.weights == str(path) and info.weights_detail.startswith("loaded from")
    images = pattern_images(2)
    np.testing.assert_allclose(make_forward(loaded)(images), forward(images), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_bfloat16_is_opt_in_close_to_float32_and_restores_policy(
    forward: Callable[[np.ndarray], np.ndarray],
) -> None:
    import keras

    model, info = build_model("none", seed=0, precision="bfloat16")
    assert info.precision == "bfloat16" and info.metadata(96)["precision"] == "bfloat16"
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    images = pattern_images(4)
    got = make_forward(model)(images)
    want = forward(images)
    assert got.dtype == np.float32
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    with pytest.raises(
        ImageSearchError, match="precision = 'float16'; choose from float32, bfloat16"
    ):
        build_model("none", precision="float16")


@pytest.mark.slow
def test_cataloguing_a_large_file_keeps_memory_flat_and_embeds_each_content_once(
    tmp_path: Path,
) -> None:
    """A sparse 2.76 GB file of 100,000 identical (black) images: every image is hashed, memory
    stays flat (mapped pages are released as the pass goes), and one content is embedded once."""
    import subprocess
    import sys

    data = tmp_path / "big.bin"
    with open(data, "wb") as f:  # sparse 2.76 GB file
        f.truncate(100_000 * 27_648)
    code = f"""
import resource, numpy as np
from pathlib import Path
import tasks.features.embed as e
from tasks.sources.collection import Stl10Collection
from tasks.storage import RunFolder
calls = []
def forward(b):
    calls.append(len(b))
    return np.zeros((len(b), 2048), np.float32)
e.forward_factory = lambda spec, meta: lambda: forward
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cat = e.catalog_collection(Stl10Collection({str(data)!r}), RunFolder(Path({str(tmp_path / "o")!r})),
                           e.ModelSpec("none"), batch_size=64, progress=False)
print(cat.stats["listed"], cat.stats["embedded"], cat.stats["duplicates"], sum(calls))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts, grew = proc.stdout.strip().splitlines()[-2:]
    assert counts.split() == ["100000", "1", "99999", "1"]
    assert int(grew) < 300, f"peak memory grew by {grew} MiB"


@pytest.mark.slow
def test_random_weights_are_a_pure_function_of_the_seed(random_resnet: Any) -> None:
    a, _ = random_resnet  # built with seed 0 earlier in this process
    b, _ = build_model("none", seed=0)
    c, _ = build_model("none", seed=1)
    images = pattern_images(2)
    fa, fb, fc = (make_forward(m)(images) for m in (a, b, c))
    np.testing.assert_array_equal(fa, fb)
    assert not np.allclose(fa, fc)
