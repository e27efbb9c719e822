"""The tiers of an index: exact answers from the certified scan of the int8 copy (the same as a
float64 brute force on planted ties, duplicates and near-ties, one query at a time and in small
batches), the approximate index whose stored recall a brute force here recomputes, the query
that asks for exact and gets it, damaged or missing derived files passed over with a log line
and never mislabelled, and the stages that write them resuming where they stopped."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.million import ResnetLike, features_of, write_index
from tasks.ask import open_index, search, tier
from tasks.ask.compact import ROW_TERMS, non_negative, open_compact, write_compact
from tasks.ask.files import MatrixFile
from tasks.layout import ANN_INDEX, ANN_INFO, INDEX_COMPACT, INDEX_MATRIX
from tasks.search import ann as approximate
from tasks.search.certified import prepare_certified, search_certified
from tests.test_certified import adversarial, assert_identical, reference

N = 3000  # rows of the tiered index: 6 clusters of ~500


def float64_knn(data: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: float64 distances from difference vectors, stable sort (ties: lower row)."""
    full = reference(data, queries)
    pos = np.argsort(full, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(full, pos, axis=1), pos


def compact_of(tmp: Path, data: np.ndarray) -> Any:
    """The certified index of ``data`` through its compact copy files, as the query core opens
    it (the float32 rows memory-mapped)."""
    np.save(tmp / "m.npy", data)
    unsigned = non_negative(MatrixFile(tmp / "m.npy"))
    zero_point = write_compact(tmp / "m.npy", tmp / "v.npy", tmp / "r.npy", unsigned=unsigned)
    mapped = np.load(tmp / "m.npy", mmap_mode="r")
    return open_compact(tmp / "v.npy", tmp / "r.npy", mapped, zero_point)


# -- the compact copy -------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [False, True])
def test_certified_single_queries_from_the_compact_copy_equal_a_float64_brute_force(
    tmp_path: Path, signed: bool
) -> None:
    index, queries = adversarial(64, seed=3, signed=signed)
    full = reference(index, queries)
    prepared = compact_of(tmp_path, index)
    assert prepared.fmt == "int8" and prepared.engine.name.startswith("onnxruntime")
    for k in (1, 5, 13):
        single = [search_certified(prepared, q[None], k) for q in queries]
        dist = np.concatenate([d for d, _ in single])
        pos = np.concatenate([p for _, p in single])
        assert_identical(dist, pos, full, k)  # every planted tie resolved by lower position
        for batch in (4, 8):  # the service's small batches
            parts = [
                search_certified(prepared, queries[s : s + batch], k)
                for s in range(0, len(queries), batch)
            ]
            np.testing.assert_array_equal(np.concatenate([p for _, p in parts]), pos)


@pytest.mark.parametrize("signed", [False, True])
def test_the_compact_copy_is_the_certified_index_prepare_certified_makes(
    tmp_path: Path, signed: bool
) -> None:
    index, _ = adversarial(40, seed=4, signed=signed)
    if signed:
        index[:3000] = np.abs(index[:3000])  # blocks of both kinds: one rule for all rows
    ours = compact_of(tmp_path, index)
    theirs = prepare_certified(index, "int8")
    for f in dataclasses.fields(ours):
        a, b = getattr(ours, f.name), getattr(theirs, f.name)
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b, err_msg=f.name)
        elif f.name in ("err_max", "g_max", "reduced_norm_max", "bound", "reduced_nbytes"):
            assert a == b, f.name
    for name in ("half_sq", "g", "data_sq", "err_max", "g_max", "bound"):
        a, b = getattr(ours.fallback_index, name), getattr(theirs.fallback_index, name)
        assert np.array_equal(a, b), name
    stored = np.load(tmp_path / "v.npy")  # the engine's layout: (d, n) int8
    assert stored.shape == index.shape[::-1] and stored.dtype == np.int8


def test_the_compact_copy_resumes_from_a_block(tmp_path: Path, monkeypatch: Any) -> None:
    import tasks.ask.compact as compact

    monkeypatch.setattr(compact, "BLOCK_ROWS", 1024)
    rng = np.random.default_rng(0)
    data = np.maximum(rng.standard_normal((3500, 48), dtype=np.float32), 0)
    np.save(tmp_path / "m.npy", data)
    whole = tmp_path / "whole"
    whole.mkdir()
    write_compact(tmp_path / "m.npy", whole / "v.npy", whole / "r.npy", unsigned=True)

    class Stop(Exception):
        pass

    def stop_after_two(rows_done: int) -> None:
        if rows_done >= 2048:
            raise Stop

    parts = tmp_path / "parts"
    parts.mkdir()
    with pytest.raises(Stop):
        write_compact(
            tmp_path / "m.npy",
            parts / "v.npy",
            parts / "r.npy",
            unsigned=True,
            on_block=stop_after_two,
        )
    write_compact(tmp_path / "m.npy", parts / "v.npy", parts / "r.npy", unsigned=True, start=2048)
    for name in ("v.npy", "r.npy"):
        assert (parts / name).read_bytes() == (whole / name).read_bytes()


def test_matrix_file_reads_blocks_and_rows_as_the_array(tmp_path: Path) -> None:
    data = np.arange(70 * 9, dtype=np.float32).reshape(70, 9)
    np.save(tmp_path / "m.npy", data)
    rows = MatrixFile(tmp_path / "m.npy")
    assert rows.shape == (70, 9) and len(rows) == 70
    np.testing.assert_array_equal(np.concatenate([b for _, b in rows.blocks(16)]), data)
    assert [s for s, _ in rows.blocks(16, start=32)] == [32, 48, 64]
    picks = np.array([69, 0, 33, 33])
    np.testing.assert_array_equal(rows.take(picks), data[picks])
    assert ROW_TERMS.itemsize == 28


# -- an index with every tier -----------------------------------------------------------------


@dataclass
class Tiered:
    out: Path
    data: np.ndarray  # (N, 2048) the index rows, by position
    queries: np.ndarray  # held-out rows of the same clusters


def build_tiers(out: Path, random_resnet: Any, data: ResnetLike, n: int = N) -> None:
    """The stages a run adds after embedding, on ``n`` rows of ``data``, with the approximate
    index; the exported model is the session's random ResNet50."""
    import tasks.features.serving as serving
    from tasks.layout import run_stages
    from tasks.storage import RunFolder
    from tasks.types import ModelSpec

    write_index(out, n, data)
    run = RunFolder(out)
    features = features_of(out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(serving, "build_model", lambda *a, **kw: random_resnet)
        serving.index_copy(features, run)
        serving.index_compact(features, run, progress=False)
        assert serving.ann_index(features, run, "on", progress=False) is not None
        serving.query_model(ModelSpec("none", 0, "float32", 96), run, features.model["model_key"])
    run.commit(run_stages([]))


@pytest.fixture(scope="module")
def tiered(tmp_path_factory: pytest.TempPathFactory, random_resnet: Any) -> Tiered:
    out = tmp_path_factory.mktemp("tiers") / "out"
    data = ResnetLike.sized(N)
    build_tiers(out, random_resnet, data)
    return Tiered(out, np.load(out / INDEX_MATRIX), data.queries(40))


def copy_of(tiered: Tiered, dest: Path) -> Path:
    shutil.copytree(tiered.out, dest, ignore=shutil.ignore_patterns(".staging"))
    return dest


def test_the_stored_recall_is_the_recall_a_brute_force_measures(tiered: Tiered) -> None:
    described = json.loads((tiered.out / ANN_INFO).read_text())
    recall = described["recall"]
    sample = np.array(recall["sample"])
    assert recall["k"] == 10 and len(sample) == 150 and recall["target"] == 0.99
    assert not set(sample) & set(recall["tuning"])  # the setting was chosen on other rows
    index = open_index(tiered.out)
    assert index.approximate is not None
    assert index.approximate.probe == approximate.Probe(**described["probe"])
    data = tiered.data
    # Each sampled row asks the query core for 11 neighbours; itself left out, 10 remain.
    found = search(index, data[sample], 11)
    hits = []
    for p, (neighbours, how) in zip(sample, found, strict=True):
        assert how.name == "approximate" and how.recall == recall["value"]
        others = np.delete(np.arange(len(data)), p)
        true_d, _ = float64_knn(data[others], data[p][None], 10)
        got = [n.image_id for n in neighbours if n.image_id != p][:10]  # ids are positions
        got_d = reference(data[got], data[p][None])[0]
        hits.append(np.count_nonzero(got_d <= true_d[0, -1]) / 10)
    assert float(np.mean(hits)) == pytest.approx(recall["value"], abs=1e-12)
    assert recall["value"] >= 0.99  # what this data reaches; the build says when it does not


def test_a_query_that_asks_for_exact_gets_exact(tiered: Tiered) -> None:
    index = open_index(tiered.out)
    assert index.certified is not None and index.approximate is not None
    k = 10
    true_d, true_p = float64_knn(tiered.data, tiered.queries, k)
    exact = search(index, tiered.queries, k, exact=True)
    for (neighbours, how), d_row, p_row in zip(exact, true_d, true_p, strict=True):
        assert how == tier(index, exact=True)
        assert how.name == "exact" and how.recall is None and "int8" in how.method
        assert [n.image_id for n in neighbours] == list(p_row)
        np.testing.assert_allclose([n.distance for n in neighbours], d_row, rtol=1e-6)
    approx = search(index, tiered.queries, k)
    assert {how.name for _, how in approx} == {"approximate"}
    for q, (neighbours, _) in zip(tiered.queries, approx, strict=True):
        # Distances of an approximate answer are exact; only the set may miss a neighbour.
        ids = [n.image_id for n in neighbours]
        np.testing.assert_allclose(
            [n.distance for n in neighbours], reference(tiered.data[ids], q[None])[0], rtol=1e-6
        )


def test_missing_or_damaged_approximate_files_fall_back_to_exact_with_a_log_line(
    tiered: Tiered, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, true_p = float64_knn(tiered.data, tiered.queries[:5], 5)

    def assert_exact(folder: Path, why: str) -> None:
        caplog.clear()
        with caplog.at_level("INFO", logger="tasks.ask"):
            index = open_index(folder, wait_s=0.01)
        assert index.approximate is None
        assert "the approximate index is not used, answers are exact" in caplog.text
        assert why in caplog.text, caplog.text
        found = search(index, tiered.queries[:5], 5)
        for (neighbours, how), p_row in zip(found, true_p, strict=True):
            assert how.name == "exact" and how.recall is None
            assert [n.image_id for n in neighbours] == list(p_row)

    missing = copy_of(tiered, tmp_path / "missing")
    (missing / ANN_INDEX).unlink()
    assert_exact(missing, "features/ann.faiss is missing")

    truncated = copy_of(tiered, tmp_path / "truncated")
    with open(truncated / ANN_INDEX, "r+b") as f:
        f.truncate(1000)
    assert_exact(truncated, "features/ann.faiss holds 1,000 bytes where its record")

    garbled = copy_of(tiered, tmp_path / "garbled")  # same size and time, other bytes
    path = garbled / ANN_INDEX
    st = path.stat()
    path.write_bytes(b"\x00" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert_exact(garbled, "not a readable FAISS index")

    no_info = copy_of(tiered, tmp_path / "no-info")
    (no_info / ANN_INFO).write_text("{}")
    assert_exact(no_info, "features/ann.json")


def test_a_damaged_int8_copy_is_passed_over_and_answers_stay_exact(
    tiered: Tiered, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = copy_of(tiered, tmp_path / "int8")
    with open(folder / INDEX_COMPACT, "r+b") as f:
        f.truncate(5000)
    with caplog.at_level("INFO", logger="tasks.ask"):
        index = open_index(folder, wait_s=0.01)
    assert index.certified is None
    assert "exact answers scan the float32 rows, not their int8 copy" in caplog.text
    _, true_p = float64_knn(tiered.data, tiered.queries[:5], 5)
    for (neighbours, how), p_row in zip(
        search(index, tiered.queries[:5], 5, exact=True), true_p, strict=True
    ):
        assert how.name == "exact" and "float32" in how.method
        assert [n.image_id for n in neighbours] == list(p_row)


def test_an_interrupted_approximate_build_resumes_and_gives_the_same_index(
    tiered: Tiered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.features.serving as serving
    from tasks.search.ann import build
    from tasks.storage import RunFolder

    out = copy_of(tiered, tmp_path / "resume")
    for rel in (ANN_INDEX, ANN_INFO, ".state/ann.json"):
        (out / rel).unlink()
    monkeypatch.setattr(build, "ADD_ROWS", 512)
    monkeypatch.setattr(serving, "ANN_CHECKPOINT_ROWS", 1000)
    original = approximate.add
    calls = {"blocks": 0}

    def interrupted(index: Any, rows: Any, start: int = 0, on_block: Any = None) -> Any:
        def block(done: int) -> None:
            assert on_block is not None
            on_block(done)
            calls["blocks"] += 1
            if done >= 2048:
                raise KeyboardInterrupt

        return original(index, rows, start, block)

    features = features_of(out)
    monkeypatch.setattr(approximate, "add", interrupted)
    with pytest.raises(KeyboardInterrupt):
        serving.ann_index(features, RunFolder(out), "on", progress=False)
    assert (out / ".staging" / "features" / "ann.faiss.partial").is_file()
    resumed_from = []
    monkeypatch.setattr(
        approximate,
        "add",
        lambda index, rows, start=0, on_block=None: (
            resumed_from.append(start) or original(index, rows, start, on_block)
        ),
    )
    info = serving.ann_index(features, RunFolder(out), "on", progress=False)
    assert resumed_from == [2048]
    assert info is not None
    assert (
        info["recall_at_10"] == json.loads((tiered.out / ANN_INFO).read_text())["recall"]["value"]
    )
    assert not (out / ".staging" / "features" / "ann.faiss.partial").exists()


# -- the command line and the service -----------------------------------------------------------


@pytest.fixture(scope="module")
def forward(random_resnet: Any) -> Any:
    from tasks.features.model import make_forward

    return make_forward(random_resnet[0])


def embedding_of(image: Path, forward: Any) -> np.ndarray:
    from tasks.sources.images import decode_image

    return np.asarray(forward(decode_image(image.read_bytes(), 96).pixels[None]))


def test_the_query_command_says_the_tier_and_answers_exact_when_asked(
    tiered: Tiered, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import main

    stored = json.loads((tiered.out / ANN_INFO).read_text())["recall"]["value"]
    image = tiered.out / "images" / "img03.png"
    args = ["query", str(image), "--index", str(tiered.out), "--k", "5"]
    assert main([*args, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 5 and {r["tier"] for r in rows} == {"approximate"}
    assert {r["recall_at_10"] for r in rows} == {stored}
    assert main([*args, "--exact", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["tier"], r["recall_at_10"]) for r in rows} == {("exact", None)}
    index = open_index(tiered.out)
    from tasks.ask import load_forward, model_spec

    assert index.model_file is not None
    query = embedding_of(image, load_forward(model_spec(index.meta), index.model_file))
    _, true_p = float64_knn(tiered.data, query, 5)
    assert [r["image_id"] for r in rows] == list(true_p[0])
    assert main(args) == 0
    table = capsys.readouterr().out
    assert f"tier: approximate (IVF-PQ, {index.approximate.probe.nprobe} lists" in table
    assert f"recall@10 {stored:.4f}, measured against exact search on 150" in table


def commit_into(src: Path, dest: Path) -> None:
    """Move the index in ``src`` into ``dest`` as a run commits: stage by stage, each stage's
    outputs renamed into place before its record; the catalog (no record here) first."""
    os.replace(src / "catalog.parquet", dest / "catalog.parquet")
    for record in sorted((src / ".state").glob("*.json")):
        for rel in json.loads(record.read_text())["outputs"]:
            os.replace(src / rel, dest / rel)
        os.replace(record, dest / ".state" / record.name)


@pytest.mark.slow
def test_the_service_swaps_an_index_with_its_approximate_index_as_one_set(
    tiered: Tiered, tmp_path: Path, random_resnet: Any, forward: Any
) -> None:
    import asyncio

    import httpx

    from service.app import create_app
    from service.engine import Engine
    from tasks.sources.images import decode_image

    served = copy_of(tiered, tmp_path / "served")
    # Swapped by the test alone: a watcher's own refresh could take the new index first.
    engine = Engine(served, build=lambda spec, exported: forward, reload_interval=3600)
    image = tiered.out / "images" / "img05.png"
    query = embedding_of(image, forward)
    first = json.loads((served / ANN_INFO).read_text())["recall"]["value"]

    async def ask(exact: bool) -> dict[str, Any]:
        transport = httpx.ASGITransport(app=create_app(engine))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            files = {"image": ("q.png", image.read_bytes())}
            resp = await client.post(f"/search?k=5&exact={str(exact).lower()}", files=files)
            assert resp.status_code == 200, resp.text
            return dict(resp.json())

    engine.start()
    try:
        answer = asyncio.run(ask(False))
        assert (answer["tier"], answer["recall_at_10"]) == ("approximate", first)
        answer = asyncio.run(ask(True))
        assert (answer["tier"], answer["recall_at_10"]) == ("exact", None)
        assert "int8" in answer["method"]
        _, true_p = float64_knn(tiered.data, query, 5)
        assert [n["image_id"] for n in answer["neighbours"]] == list(true_p[0])

        # A run commits another index, its approximate index with it.
        other = tmp_path / "other"
        build_tiers(other, random_resnet, ResnetLike.sized(2500, seed=7), n=2500)
        second = json.loads((other / ANN_INFO).read_text())["recall"]
        other_data = np.load(other / INDEX_MATRIX)
        old = engine.loaded
        commit_into(other, served)
        assert engine.refresh() is True
        new = engine.loaded.index
        assert len(new) == 2500 and new.approximate is not None
        assert new.approximate.recall is not None
        assert new.approximate.recall.sample == second["sample"]
        assert engine.health()["tiers"]["approximate"]["recall_at_10"] == second["value"]
        answer = asyncio.run(ask(True))
        _, true_p = float64_knn(other_data, query, 5)
        assert [n["image_id"] for n in answer["neighbours"]] == list(true_p[0])
        assert asyncio.run(ask(False))["recall_at_10"] == second["value"]
        # A request that took the old index before the swap finishes on it, tiers included.
        pixels = decode_image(image.read_bytes(), 96).pixels
        on_old = engine.submit(old, pixels, 5).result(timeout=60)
        assert on_old.tier.recall == first
        on_old_exact = engine.submit(old, pixels, 5, exact=True).result(timeout=60)
        _, true_p = float64_knn(tiered.data, query, 5)
        assert [n.image_id for n in on_old_exact.neighbours] == list(true_p[0])
    finally:
        engine.stop()


def test_an_interrupted_int8_copy_resumes_at_its_checkpoint(
    tiered: Tiered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.ask.compact as compact
    import tasks.features.serving as serving
    from tasks.layout import INDEX_COMPACT_ROWS
    from tasks.storage import RunFolder

    out = copy_of(tiered, tmp_path / "resume-int8")
    for rel in (INDEX_COMPACT, INDEX_COMPACT_ROWS, ".state/index-compact.json"):
        (out / rel).unlink()
    monkeypatch.setattr(compact, "BLOCK_ROWS", 1024)
    original = compact.write_compact
    starts: list[int] = []

    def interrupted(*args: Any, on_block: Any = None, **kwargs: Any) -> int:
        starts.append(kwargs["start"])

        def block(done: int) -> None:
            on_block(done)
            if done >= 2048 and len(starts) == 1:
                raise KeyboardInterrupt

        return original(*args, on_block=block, **kwargs)

    monkeypatch.setattr(compact, "write_compact", interrupted)
    features = features_of(out)
    with pytest.raises(KeyboardInterrupt):
        serving.index_compact(features, RunFolder(out), progress=False)
    info = serving.index_compact(features, RunFolder(out), progress=False)
    assert starts == [0, 2048] and info["rows"] == N
    RunFolder(out).commit(["index-compact"])
    for rel in (INDEX_COMPACT, INDEX_COMPACT_ROWS):
        assert (out / rel).read_bytes() == (tiered.out / rel).read_bytes()


@pytest.mark.gpu
def test_the_approximate_index_filled_on_a_gpu_answers_as_the_cpu_one(tiered: Tiered) -> None:
    from tasks.search.ann import gpu

    if gpu.gpu_count() == 0:
        pytest.skip("FAISS here has no GPU build or sees no CUDA device")
    rows = MatrixFile(tiered.out / INDEX_MATRIX)
    tuning, measured, train_rows = approximate.sample_positions(len(rows), 0)
    design = approximate.Design.of(len(rows), rows.shape[1], len(train_rows))
    trained = approximate.train(rows, design, train_rows)
    filled = gpu.to_cpu(approximate.add(gpu.to_gpu(trained), rows))
    ann = approximate.tune(
        approximate.AnnIndex(filled, design, approximate.Probe(*approximate.LADDER[0])),
        rows,
        tuning,
        measured,
    )
    stored = json.loads((tiered.out / ANN_INFO).read_text())["recall"]["value"]
    assert ann.recall is not None and ann.recall.value >= min(stored, 0.99) - 0.01
