"""The real flow on your own images: a folder of JPEG/PNG/WebP files in class folders, some of
them broken, indexed (every usable image, so each one finds itself); then grown, shrunk and
re-indexed incrementally. A folder of one class measures no quality and says why."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.image_search import image_search
from flows.params import SearchParams
from tasks.errors import ImageSearchError
from tasks.sources.collection import SEP
from tests.test_quality import class_images

pytestmark = pytest.mark.usefixtures("prefect_harness")

FORMATS = ("JPEG", "PNG", "WEBP")
BROKEN = {
    "class0/empty.jpg": b"",
    "class1/text.png": b"this is not a PNG\n" * 20,
    "class2/dot.png": None,  # a 1x1 image, written below
    "class2/cut.jpg": None,  # a truncated JPEG, written below
}


def write_images(root: Path, images: np.ndarray, labels: np.ndarray, start: int = 0) -> None:
    """One file per image in ``root/<label>/``, the format cycling through JPEG, PNG, WebP."""
    for i, (image, label) in enumerate(zip(images, labels, strict=True), start):
        fmt = FORMATS[i % 3]
        path = root / str(label) / f"img{i:04d}.{fmt.lower().replace('jpeg', 'jpg')}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path, format=fmt, quality=95)


def catalog_stats(out: Path) -> dict[str, int]:
    """The counters of the catalog pass that wrote the catalog in place (its stage record)."""
    record = json.loads((out / ".state" / "catalog.json").read_text())
    return dict(record["info"]["stats"])


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    images, labels = class_images(60, 3, size=80, seed=1)
    write_images(root, images, labels)
    for name, data in BROKEN.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("dot.png"):
            Image.new("RGB", (1, 1)).save(root / name)
        elif name.endswith("cut.jpg"):
            buf = io.BytesIO()
            Image.fromarray(images[0]).save(buf, format="JPEG")
            (root / name).write_bytes(buf.getvalue()[:700])
        else:
            (root / name).write_bytes(data or b"")
    return root


def run(photos: Path, out: Path, **kw: object) -> dict[str, str]:
    params = SearchParams(source=str(photos), out=str(out), weights="none", batch_size=32, **kw)
    state = image_search(**params.model_dump(), return_state=True)
    assert state.is_completed(), state.message
    return dict(state.result())


def test_own_folder_indexes_reports_errors_and_grows_incrementally(
    photos: Path, tmp_path: Path, reuse_random_resnet: None
) -> None:
    work = tmp_path / "photos"
    shutil.copytree(photos, work)
    out = tmp_path / "out"
    outputs = run(work, out)
    assert {"catalog", "errors", "quality", "duplicates"} <= outputs.keys()

    catalog = pq.read_table(out / "catalog.parquet").to_pandas()
    errors = pq.read_table(out / "errors.parquet").to_pandas()
    assert len(catalog) == 180 and catalog["image_id"].is_unique
    assert catalog["uri"].str.startswith(str(work)).all()
    assert catalog["sha256"].str.len().eq(64).all()
    assert set(catalog["label"]) == {"class0", "class1", "class2"}
    assert set(catalog["width"]) == {80}
    reasons = dict(zip(errors["uri"].map(lambda u: Path(u).name), errors["reason"], strict=True))
    assert set(reasons) == {"empty.jpg", "text.png", "dot.png", "cut.jpg"}
    assert reasons["empty.jpg"].startswith("empty file")
    assert reasons["text.png"] == "not an image Pillow can identify"
    assert reasons["dot.png"].startswith("too small: 1×1")
    assert "truncated" in reasons["cut.jpg"]
    stats = catalog_stats(out)
    assert (stats["listed"], stats["embedded"], stats["errors"]) == (184, 180, 4)

    # A collection: every usable image is in the index, each is a leave-one-out query.
    split = pq.read_table(out / "split.parquet").to_pandas()
    assert (split["split"] == "index").all() and split["query"].all() and len(split) == 180
    assert pq.read_table(out / "features" / "index.parquet").num_rows == 180
    compare = json.loads((out / "compare.json").read_text())
    assert compare["mode"] == "collection" and compare["n_queries"] == 180 and compare["passed"]
    neighbors = pq.read_table(out / "neighbors.parquet").to_pandas()
    assert not (neighbors["query_id"] == neighbors["neighbor_id"]).any()  # left out of its own
    quality = json.loads((out / "quality.json").read_text())
    assert quality["n_queries"] == 180 and quality["precision"]["1"] >= 0.9
    assert quality["leave_one_out"] is True
    assert {c["label"] for c in quality["per_class"]} == {"class0", "class1", "class2"}
    dup = pq.read_table(out / "duplicates.parquet")
    assert dup.column_names == ["image_id_a", "image_id_b", "distance"]
    ids_before = dict(zip(catalog["uri"], catalog["image_id"], strict=True))

    # Ten new photos and one exact copy of an old one: exactly ten are embedded.
    more, more_labels = class_images(4, 3, size=80, seed=7)
    write_images(work, more[:10], more_labels[:10], start=500)
    first = sorted(work.glob("class1/*.png"))[0]
    shutil.copy(first, work / "class1" / "copy-of-first.png")
    run(work, out)
    stats = catalog_stats(out)
    assert stats["embedded"] == 10 and stats["read"] == 11 + 4  # new, the copy, the errors
    assert stats["unchanged"] == 180 and stats["listed"] == 195
    catalog = pq.read_table(out / "catalog.parquet").to_pandas()
    assert len(catalog) == 191
    again = dict(zip(catalog["uri"], catalog["image_id"], strict=True))
    assert all(again[uri] == i for uri, i in ids_before.items())  # ids are stable
    assert min(v for u, v in again.items() if u not in ids_before) > max(ids_before.values())
    copy_sha = catalog.loc[catalog["uri"].str.endswith("copy-of-first.png"), "sha256"].item()
    assert copy_sha == catalog.loc[catalog["uri"] == str(first), "sha256"].item()
    pairs = pq.read_table(out / "duplicates.parquet").to_pandas()
    copy_id, first_id = again[str(work / "class1" / "copy-of-first.png")], again[str(first)]
    in_index = set(pq.read_table(out / "features" / "index.parquet").column("image_id").to_pylist())
    if {copy_id, first_id} <= in_index:  # both in the index: an exact duplicate pair
        row = pairs[
            (pairs.image_id_a == min(copy_id, first_id))
            & (pairs.image_id_b == max(copy_id, first_id))
        ]
        assert row["distance"].tolist() == [0.0]

    # Five photos deleted: nothing is embedded, they leave the catalog and the features.
    gone = sorted(work.glob("class0/img*.jpg"))[:5]
    for path in gone:
        path.unlink()
    run(work, out)
    stats = catalog_stats(out)
    assert (stats["embedded"], stats["removed"], stats["read"]) == (0, 5, 4)
    catalog = pq.read_table(out / "catalog.parquet").to_pandas()
    assert len(catalog) == 186 and not set(map(str, gone)) & set(catalog["uri"])
    features = {
        i
        for name in ("index", "query")
        for i in pq.read_table(out / "features" / f"{name}.parquet").column("image_id").to_pylist()
    }
    assert features == set(catalog["image_id"])


def test_too_many_broken_images_stop_the_run_and_keep_the_errors(
    photos: Path, tmp_path: Path, reuse_random_resnet: None
) -> None:
    out = tmp_path / "out"
    state = image_search(
        source=str(photos),
        out=str(out),
        weights="none",
        max_error_rate=0.01,
        return_state=True,
    )
    assert state.is_failed()
    assert state.message is not None
    assert state.message.startswith("4 of 184 images (2.2%) could not be used, more than")
    assert "max_error_rate = 1.0%" in state.message
    with pytest.raises(ImageSearchError):
        state.result()
    assert pq.read_table(out / "errors.parquet").num_rows == 4
    assert not (out / "features").exists()


def test_labelled_stl10_files_give_a_quality_table(
    tmp_path: Path, reuse_random_resnet: None
) -> None:
    """STL-10's labelled layout (train_X/y.bin, test_X/y.bin, class_names.txt): the training
    images form the index, the test images query it, and quality.json measures the search."""
    from tasks.sources.sample import to_stl10_bytes

    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    images_all, labels_all = class_images(25, 3, size=96, seed=2)  # one palette for both
    within = np.arange(75) % 25
    images_all[20] = images_all[0]  # a test image that is a copy of a training image
    for name, rows in (("train", within < 20), ("test", within >= 20)):
        images, labels = images_all[rows], labels_all[rows]
        (folder / f"{name}_X.bin").write_bytes(to_stl10_bytes(images))
        codes = np.array([int(str(lab).removeprefix("class")) + 1 for lab in labels], np.uint8)
        (folder / f"{name}_y.bin").write_bytes(codes.tobytes())
    (folder / "class_names.txt").write_text("red\ngreen\nblue\n")
    out = tmp_path / "out"
    outputs = run(folder, out, stl10_set="labelled")
    assert "quality" in outputs
    split = pq.read_table(out / "split.parquet").to_pandas()
    assert sorted(split.loc[split["split"] == "index", "image_id"]) == list(range(60))
    assert sorted(split.loc[split["split"] == "query", "image_id"]) == list(range(60, 75))
    quality = json.loads((out / "quality.json").read_text())
    assert quality["n_queries"] == 15 and quality["n_index_labelled"] == 60
    assert {c["label"] for c in quality["per_class"]} == {"red", "green", "blue"}
    assert quality["precision"]["1"] >= 0.9 and quality["map_at_10"] > 0.5
    catalog = pq.read_table(out / "catalog.parquet").to_pandas()
    assert len(catalog) == 75 and pq.read_table(out / "errors.parquet").num_rows == 0
    assert catalog_stats(out)["duplicates"] == 1 and catalog_stats(out)["embedded"] == 74
    first = catalog.iloc[0]
    assert first["uri"].endswith(f"train_X.bin{SEP}00") and first["label"] == "red"


def test_every_image_of_a_collection_finds_itself_first(
    photos: Path, tmp_path: Path, reuse_random_resnet: None, random_resnet: Any
) -> None:
    """Asked through the query core, each usable image of the folder is its own nearest
    neighbour (or an exact copy of itself is): none is held out of the index."""
    from tasks.ask import ask, open_index, query_sources
    from tasks.features.model import make_forward

    out = tmp_path / "out"
    run(photos, out, n_queries=20)
    split = pq.read_table(out / "split.parquet").to_pandas()
    assert len(split) == 180 and split["query"].sum() == 20  # a seeded sample is searched
    catalog = pq.read_table(out / "catalog.parquet").to_pandas()
    sha_of = dict(zip(catalog["uri"], catalog["sha256"], strict=True))
    index = open_index(out)
    assert len(index) == 180
    answers = ask(index, make_forward(random_resnet[0]), query_sources([str(photos)]), k=1)
    usable = [a for a in answers if a.error is None]
    assert len(usable) == 180 and len(answers) == 184  # the four broken files are named
    for answer in usable:
        (first,) = answer.neighbours
        assert first.uri == answer.query or sha_of[first.uri] == sha_of[answer.query]
        assert first.distance < 1e-2
        assert index.image(first.image_id)[0]  # the image the service shows for this id


def test_one_class_folder_gives_no_quality_and_the_report_says_why(
    tmp_path: Path, reuse_random_resnet: None, caplog: pytest.LogCaptureFixture
) -> None:
    images, labels = class_images(12, 1, size=64, seed=3)
    folder = tmp_path / "only"
    write_images(folder, images, labels)
    (folder / "class0" / "logo.svg").write_text("<svg/>")
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="tasks.sources.collection"):
        outputs = run(folder, out)
    # The run says once what its listing saw, though its catalog task lists the folder again.
    said = [r.getMessage() for r in caplog.records if r.name == "tasks.sources.collection"]
    assert said == [
        f"{folder}: folder names are not used as labels: there is one class folder ('class0'); "
        "labels need two or more",
        f"{folder}: 12 images; passed over 1 .svg",
    ]
    assert "quality" not in outputs and not (out / "quality.json").exists()
    page = (out / "report.html").read_text()
    assert "No retrieval quality" in page and "quality needs" in page
    assert "Collection mode: every usable image (12) is in the index" in page
    assert list(outputs)[-1] == "report"
