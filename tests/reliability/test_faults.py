"""Faults: ``kill -9`` at chosen moments, a network that drops, runs started together, a pod
evicted from shared storage. Each rerun resumes and ends with the outputs of an uninterrupted
run. Real processes (``tests/reliability/driver.py``), real files, a local server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.cli import main
from tasks.layout import TEMP_PREFIX
from tests.conftest import make_fake_stl10
from tests.http_server import MisbehavingServer
from tests.reliability.conftest import Proc, Runner, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

TAR = "/stl10/stl10_binary.tar.gz"
SMALL_RUN = ["--weights", "none", "--limit", "20", "--batch-size", "20", "--backends", "numpy"]


def checksums_hook(tarball: bytes, unlabeled: bytes) -> dict[str, str]:
    import hashlib

    sums = {
        "tarball": hashlib.md5(tarball).hexdigest(),
        "members": {"unlabeled_X.bin": hashlib.md5(unlabeled).hexdigest()},
    }
    return {"RELIABILITY_CHECKSUMS": json.dumps(sums)}


def embedded(count_file: Path) -> int:
    """Images the run embedded, from the driver's per-batch counter."""
    if not count_file.exists():
        return 0
    return sum(int(line) for line in count_file.read_text().split())


def finished(proc: Proc, timeout: float = 240) -> str:
    """Wait for a run that must succeed; its stderr."""
    rc = proc.wait(timeout)
    assert rc == 0, proc.err()[-4000:]
    assert "Traceback" not in proc.err()
    return proc.err()


def test_kill_during_download_and_extraction_then_network_drop(
    runner: Runner, http_server: MisbehavingServer, tmp_path: Path
) -> None:
    fake = make_fake_stl10(n=300)  # 8.3 MB, incompressible
    size = len(fake.tarball)
    http_server.files[TAR] = fake.tarball
    http_server.rate = 2 << 20  # 2 MiB/s: a download takes about four seconds
    data, out = tmp_path / "data", tmp_path / "out"
    part, tarball = data / "stl10_binary.tar.gz.part", data / "stl10_binary.tar.gz"
    hooks = checksums_hook(fake.tarball, fake.unlabeled)
    args = ["--source", http_server.url(TAR), "--out", str(out), *SMALL_RUN]

    # 1. kill -9 while the tarball streams in.
    first = runner.start(*args, data=data, hooks=hooks)
    wait_until(lambda: part.exists() and part.stat().st_size > 2 << 20, "2 MiB downloaded", first)
    first.kill()
    kept = part.stat().st_size
    assert 2 << 20 <= kept < size and not tarball.exists()
    assert fake.tarball.startswith(part.read_bytes())

    # 2. The rerun resumes with Range; the network drops once and comes back; then kill -9
    #    while unlabeled_X.bin is being extracted.
    http_server.rate = 0
    http_server.cut_once[TAR] = [1 << 20]
    n_requests = len(http_server.requests)
    pause = tmp_path / "paused"
    # The third block hashed: class_names.txt (one block) comes first in the tarball.
    hooks2 = {**hooks, "RELIABILITY_PAUSE": "extract:3", "RELIABILITY_PAUSE_FILE": str(pause)}
    second = runner.start(*args, data=data, hooks=hooks2)
    wait_until(pause.exists, "extraction under way", second)
    assert http_server.ranges(TAR)[n_requests:] == [f"bytes={kept}-", f"bytes={kept + (1 << 20)}-"]
    # The drop was not fatal: the task's next try resumed (the Range requests above) and the
    # run went on to extract.
    assert tarball.read_bytes() == fake.tarball  # verified, then moved into place
    orphans = list((data / "stl10_binary").glob(f"{TEMP_PREFIX}unlabeled_X.bin*"))
    assert len(orphans) == 1 and not (data / "stl10_binary" / "unlabeled_X.bin").exists()
    second.kill()
    assert orphans[0].exists()  # what a kill -9 leaves behind

    # 3. The next run extracts from the verified tarball (no network) and finishes.
    n_requests = len(http_server.requests)
    err = finished(runner.start(*args, data=data, hooks=hooks))
    assert len(http_server.requests) == n_requests
    assert (data / "stl10_binary" / "unlabeled_X.bin").read_bytes() == fake.unlabeled
    assert not orphans[0].exists() and not part.exists()
    assert f"removed {orphans[0]}" in err
    assert http_server.sent[TAR] < size + (2 << 20)  # never downloaded again from zero
    assert json.loads((out / "compare.json").read_text())["passed"] is True


def test_kill_during_embedding_merge_and_search_resumes_from_shared_storage(
    runner: Runner, tmp_path: Path
) -> None:
    """A pod evicted three times: each rerun on the same shared folders continues from the
    embeddings already stored, and the end result equals that of a run never interrupted."""
    shared = tmp_path / "shared"
    data, out, ref = shared / "data", shared / "out", shared / "reference"
    args = ["--source", "sample", "--weights", "none", "--limit", "120", "--batch-size", "10"]
    args += ["--backends", "numpy"]
    # Embeddings stored in parts of 30 (3 batches each); feature files in row groups of 30.
    hooks = {"RELIABILITY_ROWS_PER_PART": "30"}

    def run(folder: Path, name: str, pause: str | None = None) -> tuple[Proc, Path]:
        count = tmp_path / f"{name}.count"
        extra = {**hooks, "RELIABILITY_COUNT": str(count)}
        if pause:
            extra |= {"RELIABILITY_PAUSE": pause, "RELIABILITY_PAUSE_FILE": str(tmp_path / name)}
        return runner.start(*args, "--out", str(folder), data=data, hooks=extra), count

    reference, ref_count = run(ref, "reference")
    finished(reference)
    assert embedded(ref_count) == 120

    staged = out / ".staging" / "features"  # where a run's new features wait for the switch
    store_parts = lambda: sorted((out / ".embeddings").glob("*/part-*.arrow"))  # noqa: E731

    # Evicted mid-batch, in the second part of the store.
    first, count = run(out, "first", pause="forward:5")
    wait_until((tmp_path / "first").exists, "the fifth batch", first)
    first.kill()
    kept = store_parts()
    assert len(kept) == 1 and embedded(count) == 40
    assert not (out / "catalog.parquet").exists() and not (out / "features").exists()

    # Evicted while the feature files are written from the store.
    second, count = run(out, "second", pause="merge:2")
    wait_until((tmp_path / "second").exists, "the feature files", second)
    second.kill()
    assert embedded(count) == 120 - 30  # the stored part was reused, never embedded again
    assert store_parts()[0] == kept[0] and len(store_parts()) == 4
    assert not (out / "features" / "index.parquet").exists()
    assert list(staged.glob(f"{TEMP_PREFIX}index.parquet.*"))  # the torn file, aside

    # Evicted during the search.
    third, count = run(out, "third", pause="search:2")
    wait_until((tmp_path / "third").exists, "the search", third)
    third.kill()
    assert embedded(count) == 0  # the staged catalog and the store hold everything
    assert (staged / "index.parquet").exists()
    assert not (out / "features" / "index.parquet").exists()  # not in place before the end
    assert not (out / "neighbors.parquet").exists()

    # The last rerun embeds nothing and ends where the uninterrupted run ended.
    last, count = run(out, "last")
    finished(last)
    assert embedded(count) == 0
    for name in ("split.parquet", "features/index.parquet", "features/query.parquet"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    got, want = pq.read_table(out / "neighbors.parquet"), pq.read_table(ref / "neighbors.parquet")
    assert got.to_pydict() == want.to_pydict()
    assert json.loads((out / "compare.json").read_text())["passed"] is True


def test_two_runs_on_one_data_cache_download_once(
    runner: Runner, http_server: MisbehavingServer, tmp_path: Path
) -> None:
    fake = make_fake_stl10(n=150)  # 4.1 MB at 700 KiB/s: about six seconds
    http_server.files[TAR] = fake.tarball
    http_server.rate = 700 << 10
    data = tmp_path / "data"
    hooks = checksums_hook(fake.tarball, fake.unlabeled)
    procs = [
        runner.start(
            "--source", http_server.url(TAR), "--out", str(tmp_path / f"out{i}"), *SMALL_RUN,
            data=data, hooks=hooks,
        )
        for i in range(2)
    ]  # fmt: skip
    errs = [finished(p) for p in procs]
    assert http_server.ranges(TAR) == [None]  # one download, not two racing each other
    assert sum(f"another run is using the data cache {data}" in e for e in errs) == 1
    assert (data / "stl10_binary" / "unlabeled_X.bin").read_bytes() == fake.unlabeled
    a, b = (tmp_path / f"out{i}" / "features" / "index.parquet" for i in range(2))
    assert a.read_bytes() == b.read_bytes()


def test_two_runs_on_one_output_folder_take_turns(runner: Runner, tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    args = ["--source", "sample", *SMALL_RUN, "--limit", "60", "--out", str(out)]
    pause, resume = tmp_path / "paused", tmp_path / "resume"
    first = runner.start(
        *args,
        data=data,
        hooks={
            "RELIABILITY_ROWS_PER_PART": "20",
            "RELIABILITY_PAUSE": "forward:2",
            "RELIABILITY_PAUSE_FILE": str(pause),
            "RELIABILITY_RESUME_FILE": str(resume),
        },
    )
    wait_until(pause.exists, "the first run embedding", first)
    count = tmp_path / "second.count"
    second = runner.start(
        *args,
        data=data,
        hooks={"RELIABILITY_ROWS_PER_PART": "20", "RELIABILITY_COUNT": str(count)},
    )
    waiting = f"another run is using the output folder {out}"
    wait_until(
        lambda: waiting in second.err() or embedded(count) > 0 or not second.alive(),
        "the second run to wait or to start embedding",
    )
    assert waiting in second.err(), "the second run worked in the folder the first one uses"
    assert embedded(count) == 0
    resume.touch()
    finished(first)
    finished(second)
    assert json.loads((out / "compare.json").read_text())["passed"] is True


def test_orphaned_temporary_files_are_cleared_on_the_next_run(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["run", "--source", "sample", *SMALL_RUN, "--out", str(out)]
    assert main([*args, "--data-dir", str(tmp_path / "data")]) == 0
    orphan = out / "features" / f"{TEMP_PREFIX}index.parquet.k1ll3d"  # as atomic_path names them
    shutil.copy(out / "features" / "index.parquet", orphan)
    assert main([*args, "--data-dir", str(tmp_path / "data")]) == 0
    assert not orphan.exists()
