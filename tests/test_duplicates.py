"""Near-duplicate report: planted exact and near copies among spread-out points are found, and
nothing else; groups larger than the per-image limit; the Parquet file and the gallery."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.report.duplicates import (
    META_KEY,
    Duplicates,
    duplicates_gallery,
    gallery_caption,
    near_duplicates,
    write_duplicates,
)
from tasks.report.pictures import CAPTION_LINE

TOP = 2 * CAPTION_LINE  # the gallery's two caption lines above the grid

NOISE = 1e-3
PLANTED_ROWS = [(3, 5), (7, 10), (7, 11), (10, 11), (15, 20)]


def planted(seed: int = 0) -> tuple[np.ndarray, np.ndarray, set[tuple[int, int]], float]:
    """60 spread-out points in 16 dimensions with planted copies; ids not in row order.

    Rows 5 = 3 (exact); 10 = 11 = 7 (three copies); 20 = 15 + noise of norm ``NOISE``.
    Returns ids, embeddings, the expected id pairs (a < b) and the near pair's distance.
    """
    rng = np.random.default_rng(seed)
    emb = rng.normal(0, 10, (60, 16)).astype(np.float32)
    emb[5] = emb[3]
    emb[10] = emb[7]
    emb[11] = emb[7]
    noise = rng.normal(0, 1, 16)
    emb[20] = emb[15] + (noise / np.linalg.norm(noise) * NOISE).astype(np.float32)
    ids = (5000 - 7 * np.arange(60)).astype(np.int64)  # descending: a < b is not row order
    pairs = {(int(min(ids[i], ids[j])), int(max(ids[i], ids[j]))) for i, j in PLANTED_ROWS}
    near = float(np.linalg.norm(emb[20].astype(np.float64) - emb[15].astype(np.float64)))
    return ids, emb, pairs, near


def brute_median_nearest(emb: np.ndarray) -> float:
    x = emb.astype(np.float64)
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return float(np.median(d.min(axis=1)))


def test_finds_exactly_the_planted_pairs() -> None:
    ids, emb, pairs, near = planted()
    dup = near_duplicates(ids, emb)
    median = brute_median_nearest(emb)
    assert dup.median_nearest_distance == pytest.approx(median, rel=1e-6)
    assert dup.threshold == pytest.approx(0.1 * median, rel=1e-6)
    assert dup.ratio == 0.1 and dup.per_image == 10 and dup.n_images == 60
    # The planted pairs lie far inside the threshold, every other pair far outside.
    x = emb.astype(np.float64)
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    for i, j in PLANTED_ROWS:
        d[i, j] = d[j, i] = np.inf
    np.fill_diagonal(d, np.inf)
    assert 100 * NOISE < dup.threshold < d.min() / 2
    got = list(zip(dup.image_id_a.tolist(), dup.image_id_b.tolist(), strict=True))
    assert set(got) == pairs and len(got) == len(pairs)
    assert (dup.n_pairs, dup.n_exact, dup.n_images_at_limit) == (5, 4, 0)
    # Sorted by distance, then ids: the four exact pairs (0.0 to the last bit), then the near one.
    assert dup.distance.dtype == np.float64
    assert dup.distance[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert got[:4] == sorted(got[:4])
    assert dup.distance[4] == pytest.approx(near, rel=1e-6)
    assert np.all(dup.image_id_a < dup.image_id_b)


def test_threshold_overrides_the_ratio() -> None:
    ids, emb, pairs, _ = planted()
    exact_only = near_duplicates(ids, emb, threshold=0.0)
    assert exact_only.threshold == 0.0 and exact_only.ratio is None
    assert (exact_only.n_pairs, exact_only.n_exact) == (4, 4)
    exact_pairs = zip(exact_only.image_id_a.tolist(), exact_only.image_id_b.tolist(), strict=True)
    assert set(exact_pairs) < pairs
    # A zero ratio still reports exact copies; a huge threshold reports every seen pair.
    assert near_duplicates(ids, emb, ratio=0.0).n_pairs == 4
    everything = near_duplicates(ids, emb, threshold=1e9, per_image=3)
    assert everything.n_images_at_limit == 60
    partners = np.bincount(
        np.searchsorted(
            np.sort(ids), np.concatenate([everything.image_id_a, everything.image_id_b])
        ),
        minlength=60,
    )
    assert partners.min() >= 3  # every image's own 3 nearest are listed


def test_group_larger_than_the_limit_drops_self_by_position() -> None:
    # 13 copies at rows 0..12 with per_image = 10 (k = 11): rows 11 and 12 lose the tie to
    # rows 0..10 and never see themselves; their last column is dropped instead of a self match.
    # Rows 0..10 give all 55 pairs among themselves, rows 11 and 12 give 10 pairs each with
    # rows 0..9: 75 pairs; (10, 11), (10, 12), (11, 12) are beyond the limit.
    rng = np.random.default_rng(1)
    emb = rng.normal(0, 10, (40, 8)).astype(np.float32)
    emb[:13] = emb[0]
    dup = near_duplicates(np.arange(40, dtype=np.int64), emb)
    got = set(zip(dup.image_id_a.tolist(), dup.image_id_b.tolist(), strict=True))
    expected = {(a, b) for a in range(13) for b in range(a + 1, 13)}
    assert got == expected - {(10, 11), (10, 12), (11, 12)}
    assert (dup.n_pairs, dup.n_exact, dup.n_images_at_limit) == (75, 75, 13)
    assert dup.median_nearest_distance is not None and dup.median_nearest_distance > 0


def test_small_and_bad_inputs() -> None:
    one = near_duplicates(np.array([7]), np.ones((1, 4), np.float32))
    assert (one.n_pairs, one.median_nearest_distance) == (0, None)
    two = near_duplicates(np.array([7, 3]), np.ones((2, 4), np.float32))
    assert (two.image_id_a.tolist(), two.image_id_b.tolist(), two.distance.tolist()) == (
        [3],
        [7],
        [0.0],
    )
    emb = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="unique"):
        near_duplicates(np.array([1, 1, 2]), emb)
    with pytest.raises(ValueError, match="per_image >= 1"):
        near_duplicates(np.arange(3), emb, per_image=0)
    with pytest.raises(ValueError, match="threshold >= 0"):
        near_duplicates(np.arange(3), emb, threshold=-1.0)
    with pytest.raises(ValueError, match="one embedding per id"):
        near_duplicates(np.arange(4), emb)


def test_parquet_file(tmp_path: Path) -> None:
    ids, emb, _, _ = planted()
    dup = near_duplicates(ids, emb)
    path = tmp_path / "dups" / "duplicates.parquet"
    write_duplicates(path, dup)
    table = pq.read_table(path)
    assert table.schema.names == ["image_id_a", "image_id_b", "distance"]
    assert [f.type for f in table.schema] == [pa.int64(), pa.int64(), pa.float64()]
    assert table.column("image_id_a").to_pylist() == dup.image_id_a.tolist()
    assert table.column("image_id_b").to_pylist() == dup.image_id_b.tolist()
    assert table.column("distance").to_pylist() == dup.distance.tolist()
    meta = json.loads(table.schema.metadata[META_KEY])
    assert meta["n_pairs"] == 5 and meta["n_exact"] == 4 and meta["per_image"] == 10
    assert meta["threshold"] == dup.threshold
    assert [p.name for p in path.parent.iterdir()] == ["duplicates.parquet"]  # no temp left


def test_gallery_rows_show_each_pair() -> None:
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    pic = duplicates_gallery(a, b, np.array([0.0, 0.5, 1.25]), np.array([[1, 2], [3, 4], [5, 6]]))
    # image_grid: the caption, 4 px padding, 16 px title above each 96 px tile, 2 columns.
    assert pic.size == (2 * 100 + 4, TOP + 3 * 116 + 4)
    px = np.asarray(pic)
    for r in range(3):
        y = TOP + 4 + r * 116 + 16
        assert np.array_equal(px[y : y + 96, 4:100], a[r])
        assert np.array_equal(px[y : y + 96, 104:200], b[r])


def test_gallery_resizes_and_says_it_shows_twelve_of_thirteen() -> None:
    small = np.full((13, 32, 32, 3), 200, dtype=np.uint8)
    ids = np.arange(26).reshape(13, 2)
    pic = duplicates_gallery(small, small, np.zeros(13), ids, threshold=0.5)
    assert pic.size[1] == TOP + 12 * 116 + 4  # twelve rows: one pair each
    assert np.all(np.asarray(pic)[TOP + 20 : TOP + 116, 4:100] == 200)
    assert gallery_caption(13, 12, 0.5) == [
        "12 of 13 near-duplicate pairs shown, closest first",
        "distance <= 0.5",
    ]
    assert gallery_caption(3, 3, 0.5)[0] == "3 near-duplicate pairs"
    # The caption is drawn: dark pixels above the first row of images, and the picture is as
    # wide as the caption needs.
    caption = np.asarray(pic)[:TOP].min(axis=2)
    assert (caption < 100).sum() > 100 and pic.size[0] > 204


def test_no_pairs_is_a_picture_that_says_so() -> None:
    """Not a blank box: a small picture with the words, drawn in black on white."""
    empty = np.zeros((0, 96, 96, 3), np.uint8)
    pic = duplicates_gallery(empty, empty, np.zeros(0), np.zeros((0, 2)), threshold=1.5)
    px = np.asarray(pic).min(axis=2)
    assert pic.size[0] >= 240 and pic.size[1] < 100
    assert (px < 100).sum() > 200  # text, not an empty white box
    assert gallery_caption(0, 0, 1.5) == [
        "no near-duplicate pairs",
        "(no two index images within distance 1.5)",
    ]


def test_summary_is_json_ready() -> None:
    ids, emb, _, _ = planted()
    dup = near_duplicates(ids, emb)
    assert isinstance(dup, Duplicates)
    summary = json.loads(json.dumps(dup.summary()))
    assert summary["n_pairs"] == 5 and summary["n_exact"] == 4 and summary["n_images"] == 60
