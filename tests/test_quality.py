"""Retrieval quality: every metric on tiny cases checked by hand, the vote's tie rule, missing
labels, a small index, and a generator of labelled images that random-weight features separate."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tasks.report.quality import (
    Quality,
    labels_of,
    quality_markdown,
    retrieval_quality,
    write_quality,
)

EXACT = 1e-12


def class_images(
    n_per_class: int, n_classes: int, size: int = 96, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Labelled images whose classes differ visibly: each class has its own colour and stripe
    texture (period and orientation); images of a class vary in phase, brightness and noise.

    Returns images (n, size, size, 3) uint8 and labels (n,) str ``class0``, ``class1``, …,
    grouped by class.
    """
    rng = np.random.default_rng(seed)
    palette = rng.permutation(
        np.array(
            [
                [220, 40, 40],
                [40, 190, 60],
                [50, 70, 230],
                [230, 210, 40],
                [180, 50, 200],
                [40, 200, 210],
                [240, 140, 30],
                [120, 120, 120],
            ],
            dtype=np.float64,
        )
    )
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    images = np.empty((n_per_class * n_classes, size, size, 3), dtype=np.uint8)
    labels = np.empty(n_per_class * n_classes, dtype=object)
    for c in range(n_classes):
        colour = palette[c % len(palette)]
        period = 4.0 + 3.0 * (c % 4)
        angle = math.pi * c / max(n_classes, 1)
        axis = xx * math.cos(angle) + yy * math.sin(angle)
        for j in range(n_per_class):
            i = c * n_per_class + j
            phase = rng.uniform(0, 2 * math.pi)
            stripes = 0.5 + 0.5 * np.sin(2 * math.pi * axis / period + phase)
            light = rng.uniform(0.8, 1.0)
            img = colour * (0.35 + 0.65 * stripes[..., None]) * light
            img += rng.normal(0.0, 8.0, img.shape)
            images[i] = np.clip(img, 0, 255).astype(np.uint8)
            labels[i] = f"class{c}"
    return images, labels


def _case_a() -> Quality:
    # Index: 1 cat, 2 dogs; K = 3 is the whole index, so k = 10 is evaluated at 3.
    #   q0 cat [cat, dog, dog]: P@1 1, P@3 1/3, acc@1 yes, acc@3 no (dog 2:1), AP: R=1 -> P@1 = 1
    #   q1 dog [cat, dog, dog]: P@1 0, P@3 2/3, acc@1 no,  acc@3 yes, AP: R=2 ->
    #                           (P@2 + P@3) / 2 = (1/2 + 2/3) / 2 = 7/12
    #   q2 cat [dog, dog, cat]: P@1 0, P@3 1/3, acc@1 no,  acc@3 no,  AP: R=1 -> P@3 = 1/3
    # mean: P@1 1/3, P@3 4/9, acc@1 1/3, acc@3 1/3, mAP (1 + 7/12 + 1/3) / 3 = 23/36
    return retrieval_quality(
        np.array(["cat", "dog", "cat"]),
        np.array([["cat", "dog", "dog"], ["cat", "dog", "dog"], ["dog", "dog", "cat"]]),
        {"cat": 1, "dog": 2},
    )


def test_hand_checked_small_index() -> None:
    q = _case_a()
    assert q.n_queries == 3 and q.n_queries_unlabelled == 0 and q.n_index_labelled == 3
    assert q.ks_requested == [1, 3, 10] and q.ks == [1, 3] and q.neighbors_per_query == 3
    assert q.note is not None and "evaluated at k = 3" in q.note
    assert q.precision == {1: pytest.approx(1 / 3, abs=EXACT), 3: pytest.approx(4 / 9, abs=EXACT)}
    assert q.accuracy == {1: pytest.approx(1 / 3, abs=EXACT), 3: pytest.approx(1 / 3, abs=EXACT)}
    assert q.map_at_10 == pytest.approx(23 / 36, abs=EXACT)
    assert q.queries_without_relevant == 0
    cat, dog = q.per_class
    # cat: q0, q2 -> P@1 1/2, P@3 1/3, acc@1 1/2, acc@3 0, AP (1 + 1/3) / 2 = 2/3
    assert (cat.label, cat.n_queries, cat.n_index) == ("cat", 2, 1)
    assert cat.precision == {1: pytest.approx(0.5, abs=EXACT), 3: pytest.approx(1 / 3, abs=EXACT)}
    assert cat.accuracy == {1: pytest.approx(0.5, abs=EXACT), 3: 0.0}
    assert cat.map_at_10 == pytest.approx(2 / 3, abs=EXACT)
    # dog: q1 alone
    assert (dog.label, dog.n_queries, dog.n_index) == ("dog", 1, 2)
    assert dog.precision == {1: 0.0, 3: pytest.approx(2 / 3, abs=EXACT)}
    assert dog.accuracy == {1: 0.0, 3: 1.0}
    assert dog.map_at_10 == pytest.approx(7 / 12, abs=EXACT)


def test_hand_checked_ten_neighbours() -> None:
    # Index: 3 "a", 20 "b"; K = 10.
    #   q0 a [a b a b b b b b b b]: relevant at ranks 1, 3; R = 3 -> AP = (1 + 2/3) / 3 = 5/9
    #       P@1 1, P@3 2/3, P@10 2/10; votes @1 a yes, @3 a (2:1) yes, @10 b (8:2) no
    #   q1 b [b a b b a b b b b b]: relevant at 1, 3, 4, 6..10; R = 20 -> min(10, R) = 10,
    #       AP = (1 + 2/3 + 3/4 + 4/6 + 5/7 + 6/8 + 7/9 + 8/10) / 10
    #       P@1 1, P@3 2/3, P@10 8/10; votes all yes
    f = Fraction
    ap1 = (f(1) + f(2, 3) + f(3, 4) + f(4, 6) + f(5, 7) + f(6, 8) + f(7, 9) + f(8, 10)) / 10
    q = retrieval_quality(
        np.array(["a", "b"]),
        np.array([list("ababbbbbbb"), list("babbabbbbb")]),
        {"a": 3, "b": 20},
    )
    assert q.ks == [1, 3, 10] and q.note is None
    assert q.precision[1] == 1.0
    assert q.precision[3] == pytest.approx(2 / 3, abs=EXACT)
    assert q.precision[10] == pytest.approx((0.2 + 0.8) / 2, abs=EXACT)
    assert q.accuracy == {1: 1.0, 3: 1.0, 10: 0.5}
    assert q.map_at_10 == pytest.approx(float((f(5, 9) + ap1) / 2), abs=EXACT)
    a, b = q.per_class
    assert a.map_at_10 == pytest.approx(5 / 9, abs=EXACT)
    assert b.map_at_10 == pytest.approx(float(ap1), abs=EXACT)
    assert (a.accuracy[10], b.accuracy[10]) == (0.0, 1.0)


def test_leave_one_out_counts_one_relevant_image_fewer() -> None:
    # A collection of 2 cats and 2 dogs, every image a query, each left out of its own
    # answer: 3 other images each, so k = 10 is evaluated at 3 and R = 1 for every query.
    #   cat0 [cat, dog, dog]: AP 1       cat1 [dog, cat, dog]: AP 1/2
    #   dog0 [dog, cat, cat]: AP 1       dog1 [cat, cat, dog]: AP 1/3
    q_labels = np.array(["cat", "cat", "dog", "dog"])
    n_labels = np.array(
        [["cat", "dog", "dog"], ["dog", "cat", "dog"], ["dog", "cat", "cat"], ["cat", "cat", "dog"]]
    )
    q = retrieval_quality(q_labels, n_labels, {"cat": 2, "dog": 2}, leave_one_out=True)
    assert q.leave_one_out and q.ks == [1, 3] and q.queries_without_relevant == 0
    assert q.map_at_10 == pytest.approx((1 + 1 / 2 + 1 + 1 / 3) / 4, abs=EXACT)
    assert q.note is not None and "the index holds 4 images, the query among them" in q.note
    # Without the flag, 3 neighbours are too few for an index of 4 images held apart.
    with pytest.raises(ValueError, match="or all 4 labelled index images"):
        retrieval_quality(q_labels, n_labels, {"cat": 2, "dog": 2})
    assert "left out of its own answer" in quality_markdown(q)


def test_vote_tie_goes_to_the_label_ranked_nearest() -> None:
    # k = 2 and k = 4 are 1:1 and 2:2 ties: the label of the nearest neighbour wins.
    q = retrieval_quality(
        np.array(["cat", "cat", "cat"]),
        np.array(
            [
                ["dog", "cat", "cat", "dog"],  # tie -> dog: wrong at k = 2 and 4
                ["cat", "dog", "dog", "cat"],  # tie -> cat: right at k = 2 and 4
                ["dog", "bird", "cat", "cat"],  # k=4: cat 2 beats dog 1, bird 1: right
            ]
        ),
        {"cat": 2, "dog": 1, "bird": 1},
        ks=(2, 4),
    )
    assert q.accuracy == {2: pytest.approx(1 / 3, abs=EXACT), 4: pytest.approx(2 / 3, abs=EXACT)}
    assert "best-ranked neighbour is nearest" in q.tie_rule


def test_missing_labels_skip_queries_and_never_vote() -> None:
    q = retrieval_quality(
        np.array(["cat", None, "", float("nan")], dtype=object),
        np.array(
            [[None, None, "cat"], ["cat"] * 3, ["cat"] * 3, ["cat"] * 3],
            dtype=object,
        ),
        {"cat": 1},
        ks=(1, 3),
    )
    # Only q0 counts: @1 its neighbour has no label (no vote, not relevant); @3 cat wins 1:0.
    assert (q.n_queries, q.n_queries_unlabelled) == (1, 3)
    assert q.precision == {1: 0.0, 3: pytest.approx(1 / 3, abs=EXACT)}
    assert q.accuracy == {1: 0.0, 3: 1.0}
    assert q.map_at_10 == pytest.approx(1 / 3, abs=EXACT)  # R = 1, relevant at rank 3
    assert "3 queries without a label were skipped" in quality_markdown(q)


def test_class_without_index_images_scores_zero_and_is_counted() -> None:
    q = retrieval_quality(
        np.array(["bird", "cat"]),
        np.array([["cat", "cat"], ["cat", "dog"]]),
        {"cat": 1, "dog": 1},
        ks=(1, 2),
    )
    bird = next(c for c in q.per_class if c.label == "bird")
    dog = next(c for c in q.per_class if c.label == "dog")
    assert (bird.n_queries, bird.n_index, bird.map_at_10, bird.precision[1]) == (1, 0, 0.0, 0.0)
    assert q.queries_without_relevant == 1
    assert q.map_at_10 == pytest.approx(0.5, abs=EXACT)  # bird 0, cat 1
    # An index-only class is listed with no means.
    assert (dog.n_queries, dog.n_index, dog.map_at_10, dog.precision[1]) == (0, 1, None, None)


def test_too_few_neighbours_for_a_large_index_is_refused() -> None:
    with pytest.raises(ValueError, match=r"at least max\(max\(ks\), 10\) = 10 .* K = 3"):
        retrieval_quality(np.array(["a"]), np.array([["a", "a", "a"]]), {"a": 20})
    with pytest.raises(ValueError, match="shape"):
        retrieval_quality(np.array(["a", "b"]), np.array([["a"]]), {"a": 1})
    with pytest.raises(ValueError, match="positive"):
        retrieval_quality(np.array(["a"]), np.array([["a"]]), {"a": 1}, ks=(0,))


def test_no_labelled_query_gives_no_means() -> None:
    q = retrieval_quality(np.array([None], dtype=object), np.array([["a"]]), {"a": 1}, ks=(1,))
    assert (q.n_queries, q.precision, q.map_at_10) == (0, {1: None}, None)
    assert "| **all** | 0 | – |" in quality_markdown(q)


def test_write_quality_round_trips_and_markdown_shows_the_numbers(tmp_path: Path) -> None:
    q = _case_a()
    path = tmp_path / "out" / "quality.json"
    write_quality(path, q)
    raw = json.loads(path.read_text())
    assert raw["precision"] == {"1": pytest.approx(1 / 3), "3": pytest.approx(4 / 9)}
    assert Quality.model_validate(raw) == q
    md = quality_markdown(q)
    assert "| class | queries | P@1 | P@3 | acc@1 | acc@3 | mAP@10 | index images |" in md
    assert "| **all** | 3 | 0.333 | 0.444 | 0.333 | 0.333 | 0.639 | 3 |" in md
    assert "| cat | 2 | 0.500 | 0.333 | 0.500 | 0.000 | 0.667 | 1 |" in md
    assert "| dog | 1 | 0.000 | 0.667 | 0.000 | 1.000 | 0.583 | 2 |" in md
    assert "evaluated at k = 3" in md


def test_labels_of_maps_ids_of_any_shape() -> None:
    cat_ids = np.array([30, 10, 20], dtype=np.int64)
    cat_labels = np.array(["c", "a", None], dtype=object)
    got = labels_of(np.array([[10, 30], [20, 10]]), cat_ids, cat_labels)
    assert got.shape == (2, 2)
    assert got.tolist() == [["a", "c"], [None, "a"]]
    with pytest.raises(
        ValueError, match=r"2 image id\(s\) are not in the catalog, e\.g\. \[5, 40\]"
    ):
        labels_of(np.array([10, 40, 5]), cat_ids, cat_labels)
    with pytest.raises(ValueError, match=r"more than once: \[10\]"):
        labels_of(np.array([10]), np.array([10, 10]), np.array(["a", "b"]))
    with pytest.raises(ValueError, match="not in the catalog"):
        labels_of(np.array([1]), np.zeros(0, np.int64), np.zeros(0, object))


def test_class_images_are_separated_by_random_weight_features(random_resnet: Any) -> None:
    from tasks.features.model import make_forward
    from tasks.search.exact import exact_knn

    images, labels = class_images(20, 3, 96, seed=1)
    assert images.shape == (60, 96, 96, 3) and images.dtype == np.uint8
    assert sorted(set(labels.tolist())) == ["class0", "class1", "class2"]
    again, _ = class_images(20, 3, 96, seed=1)
    assert np.array_equal(images, again)

    features = make_forward(random_resnet[0])(images)
    is_query = np.arange(60) % 4 == 0  # 5 queries and 15 index images per class
    index, queries = features[~is_query], features[is_query]
    _, pos = exact_knn(index, queries, 10)
    index_labels = labels[~is_query]
    names, counts = np.unique(index_labels.astype(str), return_counts=True)
    q = retrieval_quality(
        labels[is_query], index_labels[pos], dict(zip(names.tolist(), counts.tolist(), strict=True))
    )
    assert q.n_queries == 15
    assert q.precision[1] is not None and q.precision[1] >= 0.9
