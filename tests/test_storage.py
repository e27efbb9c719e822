"""The stage cache and the run folder: keys, damaged outputs, staging and the switch, relative
addressing, clean-up that touches only the product's own files, atomic writes, fingerprints."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tasks.fingerprints import code_version, sampled_fingerprint
from tasks.layout import JOURNAL, STATE_DIR, TEMP_PREFIX, StageLayout
from tasks.storage import RunFolder, atomic_path, overlap


def _write_stage(run: RunFolder, name: str, key: list[object], files: dict[str, bytes]) -> None:
    stage = run.stage(StageLayout(name, tuple(files)), key, code=["tasks.storage"])
    assert stage.done() is None
    for rel, data in files.items():
        path = stage.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    stage.finish(note=name)


def test_a_stage_is_done_only_for_its_key_and_intact_outputs(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    _write_stage(run, "a", [1], {"a.txt": b"one", "sub/b.txt": b"two"})
    assert not (tmp_path / "a.txt").exists()  # staged, not yet in place
    stage = run.stage(StageLayout("a", ("a.txt", "sub/b.txt")), [1], code=["tasks.storage"])
    assert stage.done() == {"note": "a"} and stage.path("a.txt") == run.staging / "a.txt"
    assert run.commit(["a", "never-ran"]) == ["a"]
    assert (tmp_path / "a.txt").read_bytes() == b"one"
    assert (tmp_path / "sub" / "b.txt").read_bytes() == b"two"
    done = run.stage(StageLayout("a", ("a.txt", "sub/b.txt")), [1], code=["tasks.storage"])
    assert done.done() is not None and done.path("a.txt") == tmp_path / "a.txt"
    # Another key, another output list: not done.
    assert (
        run.stage(StageLayout("a", ("a.txt", "sub/b.txt")), [2], code=["tasks.storage"]).done()
        is None
    )
    assert run.stage(StageLayout("a", ("a.txt",)), [1], code=["tasks.storage"]).done() is None
    # The same size and mtime but other bytes: the mtime check alone would miss it.
    path = tmp_path / "a.txt"
    st = path.stat()
    path.write_bytes(b"eno")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert done.done() is not None  # size and mtime match: trusted without re-reading ...
    path.write_bytes(b"xyz!")  # ... but any change of size or mtime re-reads and compares
    assert (
        run.stage(StageLayout("a", ("a.txt", "sub/b.txt")), [1], code=["tasks.storage"]).done()
        is None
    )
    path.unlink()
    assert (
        run.stage(StageLayout("a", ("a.txt", "sub/b.txt")), [1], code=["tasks.storage"]).done()
        is None
    )


def test_an_empty_or_altered_output_is_noticed(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    _write_stage(run, "c", [1], {"compare.json": b'{"passed": true}'})
    run.commit(["c"])
    (tmp_path / "compare.json").write_bytes(b"")
    assert (
        run.stage(StageLayout("c", ("compare.json",)), [1], code=["tasks.storage"]).done() is None
    )


def test_the_key_covers_the_code(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    a = run.stage(StageLayout("s", ("x",)), [1], code=["tasks.storage"])
    b = run.stage(StageLayout("s", ("x",)), [1], code=["tasks.split"])
    assert a.key != b.key  # a change to the stage's module would change its key too
    assert code_version("tasks.search") != code_version("tasks.search.exact")  # package: all


def test_a_copied_folder_answers_from_its_own_files(tmp_path: Path) -> None:
    first = RunFolder(tmp_path / "first")
    _write_stage(first, "k", [1], {".knn/x.npz": b"first's neighbours"})
    first.commit(["k"])
    shutil.copytree(first.out, tmp_path / "copy")
    shutil.rmtree(first.out)
    copy = RunFolder(tmp_path / "copy")
    stage = copy.stage(StageLayout("k", (".knn/x.npz",)), [1], code=["tasks.storage"])
    assert stage.done() is not None
    assert stage.path(".knn/x.npz") == tmp_path / "copy" / ".knn" / "x.npz"
    record = (copy.out / STATE_DIR / "k.json").read_text()
    assert str(tmp_path) not in record  # nothing inside the folder names where it was made


def test_a_switch_interrupted_halfway_is_finished_by_the_next_run(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    _write_stage(run, "split", [1], {"split.parquet": b"old split"})
    _write_stage(run, "embed", [1], {"features/index.parquet": b"old features"})
    run.commit(["split", "embed"])
    _write_stage(run, "split", [2], {"split.parquet": b"new split"})
    _write_stage(run, "embed", [2], {"features/index.parquet": b"new features"})
    # Killed after the journal and the first move: split is new, features still old.
    (run.staging / JOURNAL).write_text(json.dumps(["embed", "split"]))
    os.replace(run.staging / "features" / "index.parquet", tmp_path / "features/index.parquet")
    assert RunFolder(tmp_path).recover() == ["embed", "split"]
    assert (tmp_path / "split.parquet").read_bytes() == b"new split"
    assert (tmp_path / "features" / "index.parquet").read_bytes() == b"new features"
    assert not (run.staging / JOURNAL).exists()
    for name in ("split", "embed"):
        key = json.loads((tmp_path / STATE_DIR / f"{name}.json").read_text())["key"]
        assert key == run.stage(StageLayout(name, ()), [2], code=["tasks.storage"]).key


def test_a_stale_staged_stage_is_never_switched_in(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    _write_stage(run, "split", [1], {"split.parquet": b"kept"})
    run.commit(["split"])
    _write_stage(run, "split", [2], {"split.parquet": b"abandoned run"})  # never committed
    stage = run.stage(StageLayout("split", ("split.parquet",)), [1], code=["tasks.storage"])
    assert stage.done() is not None  # this run wants key 1, which is in place
    assert run.commit(["split"]) == []
    assert (tmp_path / "split.parquet").read_bytes() == b"kept"


def test_clean_up_removes_only_the_products_temporary_files(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    ours = [
        tmp_path / f"{TEMP_PREFIX}compare.json.1a2b",
        tmp_path / "features" / f"{TEMP_PREFIX}index.parquet.3c4d",
        run.staging / "features" / ".index.parts-k" / f"{TEMP_PREFIX}part-00001.parquet.5e6f",
    ]
    users = [
        tmp_path / "my-notes" / ".draft.tmp",
        tmp_path / ".split.parquet.abc.tmp",  # looks like an old temporary name: not ours
        tmp_path / "my-notes" / f"{TEMP_PREFIX}anything",  # our prefix, but not our folder
        tmp_path / "features" / "notes.txt",
    ]
    for path in ours + users:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert sorted(run.clean_orphans()) == sorted(ours)
    assert all(p.exists() for p in users) and not any(p.exists() for p in ours)


def test_atomic_path_keeps_the_old_file_on_error_and_respects_the_umask(tmp_path: Path) -> None:
    dest = tmp_path / "f.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert dest.read_text() == "old" and list(tmp_path.iterdir()) == [dest]
    previous = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "g.txt") as tmp:
            tmp.write_text("new")
    finally:
        os.umask(previous)
    assert (tmp_path / "g.txt").stat().st_mode & 0o777 == 0o640


def test_sampled_fingerprint_tells_files_apart_that_size_and_mtime_do_not(
    tmp_path: Path,
) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"\0" * 10_000_000)
    b.write_bytes(b"\0" * 10_000_000)
    st = a.stat()
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sampled_fingerprint(a) != sampled_fingerprint(b)  # another path and inode
    before = sampled_fingerprint(a)
    with open(a, "r+b") as f:  # an edit in place, mtime restored
        f.seek(5_000_000)
        f.write(b"\1" * (1 << 20))
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sampled_fingerprint(a) != before


def test_overlapping_folders(tmp_path: Path) -> None:
    assert overlap(tmp_path / "x", tmp_path / "x") == "is the same folder as"
    assert overlap(tmp_path / "x", tmp_path / "x" / "data") == "holds"
    assert overlap(tmp_path / "x" / "data", tmp_path / "x") == "lies inside"
    assert overlap(tmp_path / "x" / ".." / "x" / "data", tmp_path / "x") == "lies inside"
    assert overlap(tmp_path / "x", tmp_path / "xy") is None
