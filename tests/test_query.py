"""Asking an index: an index image queried by its own file finds itself at distance 0 with the
same neighbours as the batch run's features give; the command line's table, JSON and picture;
a clear refusal of a missing index, another model, a non-image, a k the index cannot give."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import tasks.query
from flows.cli import main
from tasks.errors import ImageSearchError
from tasks.features import store
from tasks.layout import INDEX_FEATURES as FEATURES
from tasks.query import (
    Index,
    answer_rows,
    ask,
    model_spec,
    open_index,
    picture,
    query_sources,
)
from tasks.search.exact import exact_knn

# Far below the distance between two different generated images (tens), far above the float32
# difference between a batch of 32 and a batch of one through the same network (~1e-4).
SELF = 1e-3


def write_images(folder: Path, n: int, start: int = 0) -> list[Path]:
    """``n`` visually distinct images (hue, stripe frequency and angle per image, some noise),
    non-square, as PNG and JPEG; the i-th is the same whatever ``start`` is."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    yy, xx = np.mgrid[0:90, 0:120].astype(np.float32)
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        hue = np.array(Image.new("HSV", (1, 1), (i * 37 % 256, 200, 220)).convert("RGB"))[0, 0]
        angle = i * 0.7
        wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (0.1 + 0.05 * (i % 7)))
        pixels = hue[None, None, :] * (0.6 + 0.4 * wave[..., None])
        pixels += rng.normal(0, 8, pixels.shape)
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        path = folder / f"img{i:03d}.{'jpg' if i % 3 == 0 else 'png'}"
        img.save(path, quality=95) if path.suffix == ".jpg" else img.save(path)
        paths.append(path)
    return paths


def build_index(images: Path, out: Path, random_resnet: Any) -> None:
    """An index of the images in ``images`` in ``out``, built by the batch run's own stages,
    with the session's random ResNet50."""
    import tasks.features.embed
    from tasks.features.embed import assemble_features, catalog_collection
    from tasks.sources.collection import open_collection
    from tasks.split import split_dataset
    from tasks.storage import RunFolder
    from tasks.types import ModelSpec

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tasks.features.embed, "build_model", lambda *a, **kw: random_resnet)
        run = RunFolder(out)
        spec = ModelSpec("none", 0, "float32", 96)
        cat = catalog_collection(
            open_collection(str(images)), run, spec, batch_size=32, progress=False
        )
        sp = split_dataset(cat, run, 0.9, 0)
        assemble_features(cat, sp, run, spec)
        run.commit(["catalog", "split", "embed"])


@dataclass
class Built:
    """A folder of images, the index built from it, and which file each index image is."""

    images: Path
    out: Path
    files: dict[int, Path]  # index image id -> its file

    def some(self, n: int) -> list[tuple[int, Path]]:
        return sorted(self.files.items())[:n]


def describe(out: Path) -> dict[int, Path]:
    index = open_index(out)
    return {int(i): Path(index.uri(p)) for p, i in enumerate(index.ids)}


_BUILT: dict[str, Built] = {}


def shared_index(tmp_path_factory: pytest.TempPathFactory, random_resnet: Any) -> Built:
    """One index of 24 generated images per test session, whichever module asks first."""
    if "index" not in _BUILT:
        base = tmp_path_factory.mktemp("query-index")
        write_images(base / "images", 24)
        build_index(base / "images", base / "out", random_resnet)
        _BUILT["index"] = Built(base / "images", base / "out", describe(base / "out"))
    return _BUILT["index"]


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory, random_resnet: Any) -> Built:
    return shared_index(tmp_path_factory, random_resnet)


@pytest.fixture(scope="session")
def random_forward(random_resnet: Any) -> Any:
    from tasks.features.model import make_forward

    return make_forward(random_resnet[0])


@pytest.fixture
def reuse_forward(random_forward: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The query path's model is the session's random ResNet50 (built once, traced once)."""
    original = tasks.query.load_forward

    def load(spec: Any) -> Any:
        if (spec.weights, spec.seed, spec.precision) == ("none", 0, "float32"):
            return random_forward
        return original(spec)

    monkeypatch.setattr(tasks.query, "load_forward", load)
    yield


def stored_neighbours(out: Path, image_id: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The batch run's answer for an index image: exact search of its stored feature row."""
    ids, emb = store.load_features(out / FEATURES)
    row = int(np.flatnonzero(ids == image_id)[0])
    d, pos = exact_knn(emb, emb[row : row + 1], k)
    return d[0], ids[pos[0]]


def test_index_image_finds_itself_with_the_batch_runs_neighbours(
    built: Built, random_forward: Any
) -> None:
    index = open_index(built.out)
    assert len(index) == len(built.files) == 22  # 24 images, 9:1 (rounded up)
    chosen = built.some(4)
    answers = ask(index, random_forward, [str(p) for _, p in chosen], k=5)
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
    built: Built, reuse_forward: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
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
    built: Built, reuse_forward: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
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
        (["--k", "50"], "k = 50, but the index in"),
        (["--weights", "imagenet"], "--weights imagenet differs from the weights the index"),
    ],
)
def test_cli_refuses_what_the_index_cannot_answer(
    built: Built, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = built.some(1)[0][1]
    code = main(["query", str(path), "--index", str(built.out), *args])
    err = capsys.readouterr().err
    assert code == (2 if args[1] == "0" else 1)
    assert message in err and "Traceback" not in err


def test_cli_refuses_missing_index_and_missing_or_non_image_query(
    built: Built, reuse_forward: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = built.some(1)[0][1]
    assert main(["query", str(path), "--index", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert f"Index folder {tmp_path / 'nowhere'} does not exist" in err
    assert "image-search run --source" in err

    assert main(["query", str(path), "--index", str(built.images)]) == 1
    assert f"{built.images} holds no {FEATURES}" in capsys.readouterr().err

    assert main(["query", str(tmp_path / "gone.jpg"), "--index", str(built.out)]) == 1
    assert f"Query image '{tmp_path / 'gone.jpg'}': no such file" in capsys.readouterr().err

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
    folder = tmp_path / "mid"
    shutil.copytree(built.out, folder, ignore=shutil.ignore_patterns(".embeddings"))
    features = folder / FEATURES
    features.write_bytes(features.read_bytes())  # same bytes, not the file the record names
    with pytest.raises(ImageSearchError, match=r"is being updated \(features/index.parquet is not"):
        open_index(folder, attempts=2, wait_s=0.01)
    (folder / ".state" / "embed.json").unlink()  # a folder assembled by hand: no record
    assert len(open_index(folder)) == 22


def test_query_sources_lists_folders_and_keeps_urls(built: Built, tmp_path: Path) -> None:
    files = sorted(str(p) for p in built.images.iterdir())
    assert query_sources([str(built.images)]) == files
    assert query_sources(["https://example.com/a.jpg", files[0]]) == [
        "https://example.com/a.jpg",
        files[0],
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageSearchError, match="holds no images"):
        query_sources([str(tmp_path / "empty")])


def test_answers_from_urls_and_the_picture(
    built: Built, random_forward: Any, http_server: Any
) -> None:
    image_id, path = built.some(1)[0]
    http_server.files["/q.png"] = path.read_bytes()
    http_server.fail_status["/gone.png"] = [404]
    index: Index = open_index(built.out)
    answers = ask(
        index, random_forward, [http_server.url("/q.png"), http_server.url("/gone.png")], 2
    )
    assert answers[0].neighbours[0].image_id == image_id
    assert answers[1].error is not None and "HTTP 404" in answers[1].error
    rows = answer_rows(answers)
    assert [r["rank"] for r in rows] == [1, 2, None]
    grid = picture(index, answers)
    assert grid.size == (3 * 100 + 4, 96 + 16 + 8)


@pytest.mark.slow
def test_query_flow_shows_a_picture_and_a_table(
    built: Built, reuse_forward: None, prefect_harness: None
) -> None:
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
