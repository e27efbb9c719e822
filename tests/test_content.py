"""The content-addressed embedding store: parts appear whole, first copy wins, damaged parts are
dropped and recomputed, dead contents are compacted away only when they dominate."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from tasks.features.content import EmbeddingStore, model_key
from tasks.features.model import DIM


def digest(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()


def rows(ids: range, value: float = 0.0) -> np.ndarray:
    """(n, 2048) float32 rows whose first column is the id (plus ``value``)."""
    out = np.zeros((len(ids), DIM), dtype=np.float32)
    out[:, 0] = np.asarray(ids, dtype=np.float32) + value
    return out


def test_parts_gather_in_any_order_and_the_first_copy_wins(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path, "k")
    store.append([digest(i) for i in range(5)], rows(range(5)))
    store.append([digest(i) for i in range(3, 8)], rows(range(3, 8), value=100))
    again = EmbeddingStore(tmp_path, "k")  # a new process reads the parts back
    assert len(again) == 8 and digest(7) in again and digest(9) not in again
    got = again.gather([digest(i) for i in (7, 0, 4, 3)])
    np.testing.assert_array_equal(got[:, 0], [107, 0, 4, 3])  # 3 and 4: the older part's rows
    with pytest.raises(KeyError):
        again.gather([digest(9)])
    assert [p.suffix for p in again.parts()] == [".arrow", ".arrow"]
    assert not list(tmp_path.rglob(".image-search-tmp.*"))


def test_a_damaged_part_is_dropped_and_its_contents_count_as_missing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = EmbeddingStore(tmp_path, "k")
    good = store.append([digest(1)], rows(range(1, 2)))
    bad = store.append([digest(2)], rows(range(2, 3)))
    bad.write_bytes(bad.read_bytes()[:100])
    fresh = EmbeddingStore(tmp_path, "k")
    assert digest(1) in fresh and digest(2) not in fresh
    assert not bad.exists() and good.exists()
    assert "is damaged" in caplog.text


def test_altered_floats_that_still_parse_are_never_published(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bytes overwritten inside a part's embeddings leave a readable Arrow file; its checksum
    catches them: the part is dropped, its contents count as missing, the log says so."""
    store = EmbeddingStore(tmp_path, "k")
    good = store.append([digest(i) for i in range(3)], rows(range(3)))
    bad = store.append([digest(i) for i in range(3, 6)], rows(range(3, 6)))
    data = bytearray(bad.read_bytes())
    at = data.find(np.float32(4.0).tobytes())  # the first column of row 4, inside the floats
    assert at > 0
    data[at : at + 4] = np.float32(4.5).tobytes()
    bad.write_bytes(bytes(data))
    fresh = EmbeddingStore(tmp_path, "k")
    assert all(digest(i) in fresh for i in range(3))
    assert not any(digest(i) in fresh for i in range(3, 6))
    assert not bad.exists() and good.exists()
    assert "do not match their checksum" in caplog.text


def test_parts_of_an_earlier_version_without_a_checksum_are_recomputed_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import pyarrow as pa

    from tasks.features.content import SCHEMA

    store = EmbeddingStore(tmp_path, "k")
    kept = store.append([digest(0)], rows(range(0, 1)))
    for i in (1, 2):
        part = store.append([digest(i)], rows(range(i, i + 1)))
        table = pa.ipc.open_file(pa.BufferReader(part.read_bytes())).read_all()
        table = table.replace_schema_metadata(None)  # as an earlier version wrote it
        with pa.OSFile(str(part), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
            writer.write_table(table)
    fresh = EmbeddingStore(tmp_path, "k")
    assert digest(0) in fresh and digest(1) not in fresh and digest(2) not in fresh
    assert fresh.parts() == [kept]
    said = [r.getMessage() for r in caplog.records if r.name == "tasks.features.content"]
    assert said == [
        f"2 embedding part(s) in {store.folder} were written by an earlier version of "
        "image-search, without a checksum; their images are embedded again, once"
    ]


def test_compaction_only_when_dead_rows_outnumber_live_ones(tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path, "k")
    store.append([digest(i) for i in range(10)], rows(range(10)))
    assert store.compact({digest(i) for i in range(6)}) == 0  # 4 dead < 6 live: kept
    assert len(store.parts()) == 1
    live = {digest(i) for i in range(3)}
    assert store.compact(live) == 7
    fresh = EmbeddingStore(tmp_path, "k")
    assert len(fresh) == 3 and len(fresh.parts()) == 1
    np.testing.assert_array_equal(
        fresh.gather(sorted(live))[:, 0],
        rows(range(3))[:, 0][np.argsort([digest(i) for i in range(3)])],
    )


def test_the_model_key_changes_with_everything_that_changes_an_embedding() -> None:
    base = model_key("none", 0, "float32", 96)
    assert base == model_key("none", 0, "float32", 96)
    others = [
        model_key("sha256:ab", 0, "float32", 96),
        model_key("none", 1, "float32", 96),
        model_key("none", 0, "bfloat16", 96),
        model_key("none", 0, "float32", 224),
    ]
    assert len({base, *others}) == 5
