"""Asking an index: an index image queried by its own file finds itself at distance 0 with the
same neighbours as the batch run's features give; the command line's table, JSON and picture;
a clear refusal of a missing index, another model, a non-image, a k the index cannot give; the
memory-mapped copy and the exported model stand in for the files of record only while they
match them."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from flows.cli import main
from tasks.ask import Index, ask, model_spec, open_index, query_sources
from tasks.errors import ImageSearchError
from tasks.features import store
from tasks.layout import INDEX_FEATURES as FEATURES
from tasks.report.answers import answer_rows, picture
from tasks.sources.images import BadImage
from tests.indexes import SELF, Built, build_index, describe, stored_neighbours, write_images

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def fast_forward(built: Built) -> Any:
    """The query path's forward pass: the index's exported model."""
    from tasks.ask import load_forward

    index = open_index(built.out)
    assert index.model_file is not None
    return load_forward(model_spec(index.meta), index.model_file)


def test_index_image_finds_itself_with_the_batch_runs_neighbours(
    built: Built, fast_forward: Any
) -> None:
    index = open_index(built.out)
    assert len(index) == len(built.files) == 22  # 24 images, 9:1 (rounded up)
    assert index.features_from == "features/index.npy" and index.model_file is not None
    chosen = built.some(4)
    answers = ask(index, fast_forward, query_sources([str(p) for _, p in chosen]), k=5)
    for (image_id, path), answer in zip(chosen, answers, strict=True):
        assert answer.error is None and answer.query == str(path)
        got = answer.neighbours
        assert [n.rank for n in got] == [1, 2, 3, 4, 5]
        assert got[0].image_id == image_id and got[0].distance < SELF
        assert got[0].uri == str(path)
        want_d, want_ids = stored_neighbours(built.out, image_id, 5)
        assert [n.image_id for n in got] == want_ids.tolist()
        np.testing.assert_allclose([n.distance for n in got], want_d, atol=SELF)
        assert got[1].distance > 100 * SELF  # the others are really other images


def test_index_holds_what_the_run_wrote_and_loads_in_place(built: Built) -> None:
    index = open_index(built.out)
    ids, emb = store.load_features(built.out / FEATURES)
    assert index.ids.tolist() == ids.tolist()
    np.testing.assert_array_equal(index.prepared.data, emb)
    assert index.prepared.data.dtype == np.float32 and index.prepared.data.flags.c_contiguous
    assert index.input_size == 96 and index.meta["weights"] == "none"
    image_id, path = built.some(1)[0]
    data, media = index.image(image_id)
    assert (data, media) == (
        path.read_bytes(),
        "image/png" if path.suffix == ".png" else "image/jpeg",
    )
    with pytest.raises(KeyError):
        index.image(10_000)
    assert index.thumbnails([image_id, 10_000]).shape == (2, 96, 96, 3)
    assert (index.thumbnails([10_000]) == 128).all()  # an unknown id shows grey


def test_cli_table_json_and_picture(
    built: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (a, pa), (b, pb) = built.some(2)
    pic = tmp_path / "neighbours.png"
    args = ["query", str(pa), str(pb), "--index", str(built.out), "--k", "3"]
    assert main([*args, "--json", "--picture", str(pic)]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert [(r["query"], r["rank"]) for r in rows] == [
        (str(p), r) for p in (pa, pb) for r in (1, 2, 3)
    ]
    assert (rows[0]["image_id"], rows[3]["image_id"]) == (a, b)
    assert rows[0]["distance"] < SELF and rows[0]["uri"] == str(pa)
    assert "random weights" in err
    with Image.open(pic) as img:  # two rows of query + 3 neighbours, 96-pixel tiles
        assert img.size == (4 * 100 + 4, 2 * (96 + 16 + 4) + 4)

    assert main(args) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == f"query: {pa}"
    assert table[1].split() == ["rank", "distance", "image_id", "uri"]
    rank, distance, image_id, uri = table[2].split()
    assert (rank, image_id, uri) == ("1", str(a), str(pa)) and float(distance) < SELF


def test_cli_folder_answers_each_image_and_names_the_bad_ones(
    built: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    queries = tmp_path / "queries"
    queries.mkdir()
    (image_id, path), _ = built.some(2)
    shutil.copy(path, queries / f"a{path.suffix}")
    (queries / "b.png").write_text("not a picture at all")
    (queries / "notes.txt").write_text("ignored: not an image name")
    assert main(["query", str(queries), "--index", str(built.out), "--k", "2", "--json"]) == 1
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert next(r["image_id"] for r in rows if r["query"].endswith(f"a{path.suffix}")) == image_id
    bad = [r for r in rows if r["query"].endswith("b.png")]
    assert bad == [{"query": str(queries / "b.png"), "rank": None, "error": bad[0]["error"]}]
    assert "not an image" in bad[0]["error"]
    assert f"{queries / 'b.png'}: not usable as a query image" in err
    assert "1 of 2 query images could not be used" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--k", "0"], "--k = 0: Input should be greater than or equal to 1"),
        (["--k", "50"], "Expected k <= n_index, but n_index = 22, k = 50: the index in"),
        (["--k", "1001"], "--k = 1001: Input should be less than or equal to 1000"),
        (["--weights", "imagenet"], "--weights imagenet differs from the weights the index"),
    ],
)
def test_cli_refuses_what_the_index_cannot_answer(
    built: Built, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = built.some(1)[0][1]
    code = main(["query", str(path), "--index", str(built.out), *args])
    err = capsys.readouterr().err
    assert code == (2 if args[1] in ("0", "1001") else 1)
    assert message in err and "Traceback" not in err


def test_cli_refuses_missing_index_and_missing_or_non_image_query(
    built: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = built.some(1)[0][1]
    assert main(["query", str(path), "--index", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert f"Index folder {tmp_path / 'nowhere'} does not exist" in err
    assert "image-search run --source" in err

    assert main(["query", str(path), "--index", str(built.images)]) == 1
    assert f"{built.images} holds no {FEATURES}" in capsys.readouterr().err

    gone = tmp_path / "gone.jpg"
    assert main(["query", str(gone), str(path), "--index", str(built.out), "--json"]) == 1
    out, err = capsys.readouterr()
    rows = json.loads(out)  # the missing one is named, the other one answered
    assert rows[0] == {"query": str(gone), "rank": None, "error": rows[0]["error"]}
    assert rows[1]["query"] == str(path) and rows[1]["distance"] < SELF
    assert f"{gone}: no such file or folder" in err
    assert "1 of 2 query images could not be used" in err

    text = tmp_path / "text.jpg"
    text.write_text("hello")
    assert main(["query", str(text), "--index", str(built.out)]) == 1
    err = capsys.readouterr().err
    assert f"{text}: not usable as a query image: not an image Pillow can identify" in err
    assert "Traceback" not in err


def copy_with_metadata(built: Built, dest: Path, **changes: Any) -> Path:
    """A copy of the index whose features carry changed metadata."""
    shutil.copytree(built.out, dest, ignore=shutil.ignore_patterns(".embeddings"))
    path = dest / FEATURES
    meta = {**store.read_metadata(path), **changes}
    ids, emb = store.load_features(path)
    store.write_tables([store.table(ids, emb)], path, meta)
    (dest / ".state" / "embed.json").unlink()  # edited by hand: no run's record describes it
    return dest


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"input_size": 128}, "The index was built with model key"),
        ({"resize": "stretch to square"}, "resize rule 'stretch to square'"),
        ({"preprocessing": "torch"}, "preprocessing 'torch'"),
        ({"model_key": "0123456789abcdef"}, "give "),
        ({"weights": "missing.weights.h5"}, "weights = 'missing.weights.h5': no such file"),
    ],
)
def test_an_index_of_another_model_is_refused(
    built: Built, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    folder = copy_with_metadata(built, tmp_path / "other", **changes)
    index = open_index(folder)
    with pytest.raises(ImageSearchError, match=re.escape(message)) as caught:
        model_spec(index.meta)
    assert "Rebuild" in str(caught.value) or "no such file" in str(caught.value)


def test_a_folder_mid_update_is_named_not_half_read(built: Built, tmp_path: Path) -> None:
    from tasks.storage import folder_lock

    folder = tmp_path / "mid"
    shutil.copytree(built.out, folder, ignore=shutil.ignore_patterns(".embeddings"))
    features = folder / FEATURES
    features.write_bytes(features.read_bytes())  # same bytes, not the file the record names
    writing = r"is being written by a run right now \(features/index.parquet is not"
    # A run is committing into the folder.
    with folder_lock(folder, "Output folder"), pytest.raises(ImageSearchError, match=writing):
        open_index(folder, attempts=2, wait_s=0.01)
    assert len(open_index(folder)) == 22  # nobody writes: the bytes are the ones recorded
    (folder / ".state" / "embed.json").unlink()  # a folder assembled by hand: no record
    assert len(open_index(folder)) == 22


def test_query_sources_lists_folders_and_keeps_urls(built: Built, tmp_path: Path) -> None:
    def named(sources: list[str]) -> list[tuple[str, str | None]]:
        return [(a.query, a.error) for a in query_sources(sources)]

    files = sorted(str(p) for p in built.images.iterdir())
    assert named([str(built.images)]) == [(f, None) for f in files]
    assert named(["https://example.com/a.jpg", files[0]]) == [
        ("https://example.com/a.jpg", None),
        (files[0], None),
    ]
    (tmp_path / "empty").mkdir()
    ((query, problem),) = named([str(tmp_path / "empty")])
    assert query == str(tmp_path / "empty") and problem is not None
    assert problem.startswith("a folder without images")


def test_answers_from_urls_and_the_picture(
    built: Built, random_forward: Any, http_server: Any
) -> None:
    image_id, path = built.some(1)[0]
    http_server.files["/q.png"] = path.read_bytes()
    http_server.fail_status["/gone.png"] = [404]
    index: Index = open_index(built.out)
    urls = [http_server.url("/q.png"), http_server.url("/gone.png")]
    answers = ask(index, random_forward, query_sources(urls), 2)
    assert answers[0].neighbours[0].image_id == image_id
    assert answers[1].error is not None and "HTTP 404" in answers[1].error
    rows = answer_rows(answers)
    assert [r["rank"] for r in rows] == [1, 2, None]
    grid = picture(index, answers)
    assert grid.size == (3 * 100 + 4, 96 + 16 + 8)


@pytest.mark.slow
def test_query_flow_shows_a_picture_and_a_table(built: Built, prefect_harness: None) -> None:
    from prefect.client.orchestration import get_client

    from flows.query import image_search_query

    image_id, path = built.some(1)[0]
    state = image_search_query(images=[str(path)], index=str(built.out), k=3, return_state=True)
    rows = state.result()
    assert next(r["image_id"] for r in rows) == image_id and rows[0]["distance"] < SELF

    async def artifacts() -> dict[str, str]:
        async with get_client() as client:
            found = await client.read_artifacts()
            return {a.key: str(a.data) for a in found if a.key}

    import asyncio

    found = asyncio.run(artifacts())
    assert "data:image/jpeg;base64," in found["query-neighbours"]
    assert str(path) in found["query-results"]


# -- the query core's own files: the memory-mapped copy, the exported model -----------------


def test_the_copy_holds_the_parquet_features_and_the_searchs_norms(built: Built) -> None:
    from tasks.search.exact import prepare_index

    index = open_index(built.out)
    ids, emb = store.load_features(built.out / FEATURES)
    reference = prepare_index(emb)
    assert index.features_from == "features/index.npy"
    assert isinstance(index.prepared.data.base, np.memmap)  # mapped, not read
    np.testing.assert_array_equal(index.ids, ids)
    np.testing.assert_array_equal(index.prepared.data, reference.data)
    np.testing.assert_array_equal(index.prepared.half_sq_norms, reference.half_sq_norms)
    assert index.prepared.max_norm == reference.max_norm


def test_a_copy_that_does_not_match_is_not_used_and_the_reason_is_logged(
    built: Built, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "stale"
    shutil.copytree(built.out, folder, ignore=shutil.ignore_patterns(".embeddings"))
    record = folder / ".state" / "index-copy.json"
    info = json.loads(record.read_text())
    info["info"]["source"] = {FEATURES: "0" * 64}  # made from other features
    record.write_text(json.dumps(info))
    with caplog.at_level("INFO", logger="tasks.ask"):
        index = open_index(folder)
    assert index.features_from == FEATURES
    assert "not its memory-mapped copy: stage index-copy made them from other files" in caplog.text
    np.testing.assert_array_equal(index.prepared.data, open_index(built.out).prepared.data)

    for rel in ("features/index.npy", "features/index-rows.npy", ".state/index-copy.json"):
        (folder / rel).unlink()
    caplog.clear()
    with caplog.at_level("INFO", logger="tasks.ask"):
        assert open_index(folder).features_from == FEATURES
    assert "no record of stage index-copy" in caplog.text


def test_an_exported_model_of_another_model_is_not_used(
    built: Built, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "other-model"
    shutil.copytree(built.out, folder, ignore=shutil.ignore_patterns(".embeddings"))
    record = folder / ".state" / "query-model.json"
    info = json.loads(record.read_text())
    info["info"]["source"] = {"model_key": "0123456789abcdef"}
    record.write_text(json.dumps(info))
    with caplog.at_level("INFO", logger="tasks.ask"):
        assert open_index(folder).model_file is None
    assert "no exported model for this index (stage query-model made them" in caplog.text


def test_thumbnails_and_images_come_from_the_indexed_bytes(built: Built, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    shutil.copytree(built.images, folder)
    out = tmp_path / "out"
    shutil.copytree(built.out, out, ignore=shutil.ignore_patterns(".embeddings"))
    index = open_index(out)
    image_id, path = built.some(1)[0]
    with Image.open(io.BytesIO(index.thumbnail(image_id, 48))) as thumb:
        assert (thumb.format, thumb.size) == ("JPEG", (48, 48))
    path.write_bytes(path.read_bytes() + b"changed")  # not the content that was indexed
    try:
        with pytest.raises(BadImage, match="changed since the index was built"):
            index.thumbnail(image_id, 48)
        with pytest.raises(BadImage, match="changed since the index was built"):
            index.image(image_id)
    finally:
        path.write_bytes(path.read_bytes()[: -len(b"changed")])


def test_picture_into_a_folder_is_a_clear_error(
    built: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = built.some(1)[0][1]
    assert main(["query", str(path), "--index", str(built.out), "--picture", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"--picture {tmp_path} is a folder; give the PNG file to write" in err
    assert "unexpected" not in err and "Traceback" not in err


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
        timeout=120,
    )
    return set(json.loads(done.stdout.splitlines()[-1]))


def _heavy(modules: set[str], *names: str) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


@pytest.mark.slow
def test_the_query_core_and_the_service_engine_import_neither_prefect_nor_tensorflow() -> None:
    modules = _modules_after("import tasks.ask, service.engine, service.app, flows.cli.ask")
    assert {"tasks.ask", "service.engine"} <= modules
    assert _heavy(modules, "prefect", "tensorflow", "keras") == []


@pytest.mark.slow
def test_help_imports_neither_tensorflow_nor_prefects_server() -> None:
    for args in ([], ["query"], ["serve"], ["run"]):
        code = f"from flows.cli import main\nmain([*{args!r}, '--help'])"
        modules = _modules_after(code)
        assert _heavy(modules, "tensorflow", "keras", "prefect.server") == [], args
        assert _heavy(modules, "prefect") == [], args


# Largest relative difference between an embedding through the exported model (onnxruntime,
# batch normalisation folded) and the batch run's (TensorFlow); measured ~1e-6.
FAST_RTOL = 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("input_size", [96, 224])
@pytest.mark.parametrize("weights", ["none", "file"])
def test_the_fast_path_gives_the_index_features(
    weights: str, input_size: int, tmp_path: Path, random_resnet: Any
) -> None:
    """Every index image, asked through the exported model, finds itself at rank 1, and its
    embedding is the batch run's within FAST_RTOL: for random weights and for a weights file
    (the random model's, saved: ImageNet's stand-in), at both input sizes."""
    from tasks.ask import load_forward
    from tasks.sources.images import decode_image

    given = "none"
    if weights == "file":
        given = str(tmp_path / "resnet50.weights.h5")
        random_resnet[0].save_weights(given)
    write_images(tmp_path / "images", 10)
    build_index(
        tmp_path / "images",
        tmp_path / "out",
        random_resnet,
        weights=given,
        input_size=input_size,
        reuse_model=weights == "none",
    )
    index = open_index(tmp_path / "out")
    assert index.model_file is not None and index.input_size == input_size
    assert index.meta["weights"] == given
    forward = load_forward(model_spec(index.meta), index.model_file)
    files = describe(tmp_path / "out")
    answers = ask(index, forward, query_sources([str(p) for p in files.values()]), 2)
    for (image_id, path), answer in zip(files.items(), answers, strict=True):
        pos = index.position(image_id)
        assert pos is not None
        stored = index.prepared.data[pos]
        fast = forward(decode_image(path.read_bytes(), input_size).pixels[None])[0]
        scale = float(np.linalg.norm(stored))
        assert np.linalg.norm(fast - stored) <= FAST_RTOL * scale, path
        nearest = answer.neighbours[0]
        assert (nearest.image_id, nearest.rank) == (image_id, 1)
        assert nearest.distance <= FAST_RTOL * scale
        assert answer.neighbours[1].distance > 1e3 * FAST_RTOL * scale


# What TensorFlow, absl and CUDA print while TensorFlow starts on a machine without a GPU.
CHATTER = re.compile(r"cudart_stub|cuInit|oneDNN|absl::InitializeLog|cpu_feature_guard|cuda")


def _query_process(built: Built, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``image-search query`` as a user runs it (TensorFlow's log level unset); it says on
    stderr whether TensorFlow was imported."""
    code = (
        "import sys\nfrom flows.cli import main\nrc = main(sys.argv[1:])\n"
        "print('tensorflow imported' if 'tensorflow' in sys.modules else 'no tensorflow', "
        "file=sys.stderr)\nsys.exit(rc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    path = built.some(1)[0][1]
    return subprocess.run(
        [sys.executable, "-c", code, "query", str(path), "--index", str(out), *extra],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )


@pytest.mark.slow
def test_query_starts_quietly_and_says_where_it_runs(built: Built, tmp_path: Path) -> None:
    fast = _query_process(built, built.out)
    assert fast.returncode == 0, fast.stderr
    assert "no tensorflow" in fast.stderr and not CHATTER.search(fast.stderr), fast.stderr
    assert "exported model (onnxruntime, CPU)" in fast.stderr

    folder = tmp_path / "no-model"
    shutil.copytree(built.out, folder, ignore=shutil.ignore_patterns(".embeddings"))
    (folder / "features" / "model.onnx").unlink()
    (folder / ".state" / "query-model.json").unlink()
    slow = _query_process(built, folder)
    assert slow.returncode == 0, slow.stderr
    assert "tensorflow imported" in slow.stderr
    assert not CHATTER.search(slow.stderr), slow.stderr
    lines = [line for line in slow.stderr.splitlines() if "running on the CPU" in line]
    assert lines == [
        "image-search: embedding queries with ResNet50 in TensorFlow: no GPU visible to "
        "TensorFlow: running on the CPU"
    ]
    assert slow.stdout.splitlines()[2].split()[0] == "1"  # answered all the same

    verbose = _query_process(built, folder, "--verbose")
    assert verbose.returncode == 0 and CHATTER.search(verbose.stderr), verbose.stderr
