"""Bad input through the real command line: a clear error naming the value and the fix, a
non-zero exit code, a Failed flow run with the same message, no traceback, and every file
that was already in the data cache and the output folder byte-identical afterwards.

Most cases call ``flows.cli.main`` in this process (on the session's Prefect API) to keep the
suite fast; ``test_bad_input_in_real_processes`` runs representative ones as real processes.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import signal
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from tasks.layout import LOCK_FILE
from tasks.sources.stl10 import IMAGE_BYTES
from tests.conftest import make_fake_stl10, make_tarball
from tests.http_server import MisbehavingServer
from tests.reliability.conftest import (
    Runner,
    assert_unchanged,
    latest_flow_run,
    snapshot,
)

# Every case runs the real command line against a finished baseline run: slow by design.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

TAR = "/stl10/stl10_binary.tar.gz"
OFFICIAL_MD5 = "91f7769df0f17e558f3565bffb0c7dfb"
BASE_ARGS = ["--source", "sample", "--weights", "none", "--limit", "100", "--batch-size", "32"]
BASE_ARGS += ["--backends", "numpy"]


@dataclass(frozen=True)
class Baseline:
    """A finished run: its data cache and output folder, which bad runs must leave alone."""

    data: Path
    out: Path

    def args(self, *extra: str, data: Path | None = None, out: Path | None = None) -> list[str]:
        """The baseline's own arguments, then ``extra`` (later options win in argparse)."""
        folders = ["--data-dir", str(data or self.data), "--out", str(out or self.out)]
        return [*BASE_ARGS, *folders, *extra]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> Baseline:
    base = tmp_path_factory.mktemp("baseline")
    b = Baseline(base / "data", base / "out")
    assert main(["run", *b.args()]) == 0
    return b


def run_cli(args: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``image-search run ARGS`` in this process: (exit code, everything it printed)."""
    capfd.readouterr()
    code = main(["run", *args])  # returns the status, whatever argparse thought of ARGS
    out, err = capfd.readouterr()
    return code, out + err


def as_fields(message: str) -> str:
    """``message`` as the run's record words it: settings as form fields, not options."""
    return re.sub(r"--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), message)


def assert_user_error(code: int, output: str, message: str, flow_failed: bool = True) -> None:
    """The command line printed ``message`` (settings as options) with no traceback; the run
    it started, if any, is Failed with the same message in form-field words."""
    assert code == (1 if flow_failed else 2), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert message in output, output[-3000:]
    if flow_failed:
        assert "image-search: error: " in output
        state = latest_flow_run().state
        assert state.is_failed(), state
        assert as_fields(message) in (state.message or ""), state.message


# -- parameters the form and the command line refuse: exit 2, no flow run at all ---------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        # One value the form refuses (tests/test_cli.py has every bound); here the point is
        # that nothing ran and nothing changed beside a finished run.
        (["--k", "0"], "--k = 0: Input should be greater than or equal to 1"),
        # Overlapping folders would make the run wait on its own lock: refused up front.
        (
            ["--data-dir", "{out}/cache"],
            "The output folder {out} (--out) holds the data cache {out}/cache (--data-dir); "
            "choose two separate folders.",
        ),
        (["--out", "{data}/out"], "The output folder {data}/out (--out) lies inside the data"),
        (["--out", "{data}"], "The output folder {data} (--out) is the same folder as the data"),
        # A source that is the output folder, or lies in it: the run would index its own
        # pictures from its second run on (samples.png, results.png...).
        (
            ["--source", "{out}"],
            "The output folder {out} (--out) is the same folder as the source folder {out} "
            "(--source): a run would index its own outputs. Choose an output folder outside "
            "the source, or a new folder inside it (the listing leaves that one out).",
        ),
        (
            ["--source", "{out}/features"],
            "The output folder {out} (--out) holds the source folder {out}/features (--source)",
        ),
    ],
)
def test_bad_parameters_exit_2_before_any_run(
    baseline: Baseline, extra: list[str], message: str, capfd: pytest.CaptureFixture[str]
) -> None:
    extra = [e.format(out=baseline.out, data=baseline.data) for e in extra]
    message = message.format(out=baseline.out, data=baseline.data)
    before = snapshot(baseline.data, baseline.out)
    latest = latest_flow_run()
    code, output = run_cli(baseline.args(*extra), capfd)
    assert_user_error(code, output, message, flow_failed=False)
    assert "image-search: error: " in output or "image-search run: error: " in output
    assert latest_flow_run().id == latest.id  # refused before a flow run was created
    assert_unchanged(before, baseline.data, baseline.out)


def test_an_output_folder_inside_the_source_is_left_out_of_its_listing(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], reuse_random_resnet: None
) -> None:
    """The other nesting is allowed: ``--source ~/Pictures --out ~/Pictures/index``. The second
    run indexes the same photos, none of the first run's own pictures."""
    from tests.indexes import write_images

    photos = tmp_path / "photos"
    written = write_images(photos, 8)
    out = photos / "index"
    args = ["--source", str(photos), "--out", str(out), "--weights", "none"]
    args += ["--backends", "numpy", "--data-dir", str(tmp_path / "data"), "--n-show", "4"]
    for _ in range(2):
        code, output = run_cli(args, capfd)
        assert code == 0, output[-3000:]
        assert (out / "samples.png").is_file()
        uris = pq.read_table(out / "catalog.parquet", columns=["uri"]).column("uri").to_pylist()
        assert sorted(uris) == sorted(str(p) for p in written)


def test_output_folder_inside_the_default_data_cache(
    baseline: Baseline, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No --data-dir: the cache comes from $IMAGE_SEARCH_DATA, which only the run resolves.
    It stops at once, before the lock it would wait on forever."""
    monkeypatch.setenv("IMAGE_SEARCH_DATA", str(baseline.data))
    before = snapshot(baseline.data, baseline.out)
    code, output = run_cli([*BASE_ARGS, "--out", str(baseline.data / "out")], capfd)
    assert_user_error(
        code,
        output,
        f"The output folder {baseline.data / 'out'} (--out) lies inside the data cache "
        f"{baseline.data} (--data-dir); choose two separate folders. The data cache comes from "
        f"$IMAGE_SEARCH_DATA, else the per-user cache folder; --data-dir sets it for one run.",
    )
    assert "waiting" not in output
    assert_unchanged(before, baseline.data, baseline.out)
    assert not (baseline.data / "out").exists()


# -- values only the data can refute: exit 1, a Failed flow run, nothing touched -------------


def _odd_bin(tmp: Path) -> Path:
    path = tmp / "odd.bin"
    path.write_bytes(bytes(IMAGE_BYTES * 3 + 5))
    return path


def _empty_bin(tmp: Path) -> Path:
    path = tmp / "empty.bin"
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--source", "ftp://example.org/x.tar.gz"], "Unsupported source 'ftp://example.org/x"),
        (["--source", "/nonexistent/stl10"], "Source '/nonexistent/stl10' is neither a URL"),
        (["--limit", "5000"], "limit = 5,000 but the dataset holds only 2,000 images; use a lim"),
        (
            ["--split-ratio", "0.999"],
            "--split-ratio = 0.999 of 100 images leaves 100 index and 0 q",
        ),
        (
            ["--split-ratio", "0.001"],
            "--split-ratio = 0.001 of 100 images leaves 0 index and 100 q",
        ),
        (["--k", "500"], "Expected k <= n_index, but n_index = 90, k = 500; lower --k or use"),
        (["--weights", "/nonexistent/w.h5"], "weights = '/nonexistent/w.h5': no such file"),
        (["--source", "{odd}"], "bytes, not a multiple of 27,648"),
        (["--source", "{empty}"], "is empty; it holds no STL-10 images"),
    ],
)
def test_bad_values_fail_the_run_cleanly(
    baseline: Baseline,
    extra: list[str],
    message: str,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    extra = [e.format(odd=_odd_bin(tmp_path), empty=_empty_bin(tmp_path)) for e in extra]
    before = snapshot(baseline.data, baseline.out, tmp_path)
    code, output = run_cli(baseline.args(*extra), capfd)
    assert_user_error(code, output, message)
    assert_unchanged(before, baseline.data, baseline.out, tmp_path)


def test_empty_split_is_refused_before_anything_is_written(
    baseline: Baseline, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(baseline.out, out)
    before = snapshot(baseline.data, out)
    args = baseline.args("--limit", "10", "--split-ratio", "0.99", out=out)
    code, output = run_cli(args, capfd)
    assert_user_error(code, output, "--split-ratio = 0.99 of 10 images leaves 10 index and 0 query")
    assert_unchanged(before, baseline.data, out)


def test_weights_of_another_architecture(
    baseline: Baseline, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    import keras

    weights = tmp_path / "small.weights.h5"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save_weights(str(weights))
    before = snapshot(baseline.data, baseline.out, tmp_path)
    # A new seed: the preview and the split of the new set are written before the weights
    # fail to load, but only into staging; the finished run's set stays whole in place.
    code, output = run_cli(baseline.args("--seed", "1", "--weights", str(weights)), capfd)
    assert_user_error(code, output, f"weights file {weights} does not fit ResNet50")
    assert_unchanged(before, baseline.data, baseline.out, tmp_path)


def test_output_folder_not_writable(
    baseline: Baseline, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    before = snapshot(baseline.data, tmp_path)
    code, output = run_cli(baseline.args(out=blocker / "out"), capfd)
    assert_user_error(code, output, f"Output folder '{blocker / 'out'}' is not writable")
    assert "choose a folder you can write to" in output
    assert_unchanged(before, baseline.data, tmp_path)


# -- sources on a local server that answers badly --------------------------------------------


@pytest.fixture
def served(http_server: MisbehavingServer) -> Iterator[tuple[MisbehavingServer, bytes]]:
    fake = make_fake_stl10(n=60)
    http_server.files[TAR] = fake.tarball
    yield http_server, fake.tarball


def assert_cache_holds_nothing(data: Path) -> None:
    """A failed source leaves no tarball, no extracted file and no temporary file behind."""
    names = sorted(p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file())
    assert [n for n in names if n not in (".verified.json", LOCK_FILE)] in ([], [TAR_PART]), names


TAR_PART = "stl10_binary.tar.gz.part"


def test_url_that_404s(
    baseline: Baseline,
    http_server: MisbehavingServer,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    before = snapshot(baseline.out)
    url = http_server.url("/missing.tar.gz")
    code, output = run_cli(baseline.args("--source", url, data=tmp_path / "data"), capfd)
    assert_user_error(code, output, f"{url} answered HTTP 404 Not Found; check the URL")
    assert_unchanged(before, baseline.out)
    assert_cache_holds_nothing(tmp_path / "data")


def test_server_that_always_closes_mid_download(
    baseline: Baseline,
    served: tuple[MisbehavingServer, bytes],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, tarball = served
    server.cut_at[TAR] = len(tarball) // 2
    monkeypatch.setenv("IMAGE_SEARCH_RETRY_BACKOFF", "0.01")
    before = snapshot(baseline.out)
    data = tmp_path / "data"
    code, output = run_cli(baseline.args("--source", server.url(TAR), data=data), capfd)
    assert_user_error(
        code,
        output,
        f"Could not download {server.url(TAR)}: connection closed after "
        f"{len(tarball) // 2} of {len(tarball)} bytes",
    )
    assert "Gave up after 6 attempts" in output
    ranges = server.ranges(TAR)
    assert ranges[0] is None and len(ranges) == 6  # every retry resumed with a Range request
    assert set(ranges[1:]) == {f"bytes={len(tarball) // 2}-"}
    assert_unchanged(before, baseline.out)
    assert_cache_holds_nothing(data)  # the partial file is kept to resume, nothing else
    assert (data / TAR_PART).read_bytes() == tarball[: len(tarball) // 2]


@pytest.mark.parametrize("truncated", [False, True], ids=["wrong-checksum", "truncated"])
def test_tarball_failing_the_official_checksum(
    baseline: Baseline,
    served: tuple[MisbehavingServer, bytes],
    truncated: bool,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    server, tarball = served
    if truncated:
        server.files[TAR] = tarball[: len(tarball) // 3]
    before = snapshot(baseline.out)
    data = tmp_path / "data"
    code, output = run_cli(baseline.args("--source", server.url(TAR), data=data), capfd)
    assert_user_error(code, output, f"expected {OFFICIAL_MD5}: the file is corrupt, truncated")
    assert "It was deleted; run again to re-download" in output
    assert_unchanged(before, baseline.out)
    assert_cache_holds_nothing(data)
    assert not (data / TAR_PART).exists()


def test_local_tarball_failing_the_official_checksum(
    baseline: Baseline, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    local = tmp_path / "mine" / "stl10_binary.tar.gz"
    local.parent.mkdir()
    local.write_bytes(make_fake_stl10(n=10).tarball)
    before = snapshot(baseline.out, local.parent)
    code, output = run_cli(baseline.args("--source", str(local), data=tmp_path / "d"), capfd)
    assert_user_error(code, output, f"expected {OFFICIAL_MD5} (the official STL-10 stl10_binary")
    assert "fetch it again, or extract your own archive" in output
    assert_unchanged(before, baseline.out, local.parent)
    assert_cache_holds_nothing(tmp_path / "d")


def _hostile_member(kind: str, outside: Path) -> tarfile.TarInfo:
    if kind == "absolute":
        info = tarfile.TarInfo(str(outside))
        info.size = 0
    elif kind == "dotdot":
        info = tarfile.TarInfo("stl10_binary/../../../escape.txt")
        info.size = 0
    elif kind == "symlink":
        info = tarfile.TarInfo("stl10_binary/link")
        info.type, info.linkname = tarfile.SYMTYPE, str(outside)
    else:
        info = tarfile.TarInfo("stl10_binary/hard")
        info.type, info.linkname = tarfile.LNKTYPE, str(outside)
    return info


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "hardlink"])
def test_tarball_with_a_member_escaping_the_cache(
    baseline: Baseline,
    http_server: MisbehavingServer,
    kind: str,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Even an archive whose checksum matches (a compromised mirror and checksum list) cannot
    write outside the data cache: the whole archive is refused."""
    import tasks.sources.resolve

    outside = tmp_path / "outside" / "pwned.txt"
    outside.parent.mkdir()
    good = make_fake_stl10(n=8).unlabeled
    # The wanted member comes first: it must be discarded too when a later one is hostile.
    hostile = make_tarball(
        {"stl10_binary/unlabeled_X.bin": good}, extra=[_hostile_member(kind, outside)]
    )
    http_server.files[TAR] = hostile
    sums = tasks.sources.resolve.Checksums(tarball=_md5(hostile), members={"unlabeled_X.bin": None})
    monkeypatch.setattr(tasks.sources.resolve, "OFFICIAL", sums)
    data = tmp_path / "data"
    before = snapshot(baseline.out, outside.parent)
    code, output = run_cli(baseline.args("--source", http_server.url(TAR), data=data), capfd)
    assert_user_error(code, output, "and would land outside")
    assert "The tarball is not a genuine STL-10 archive" in output
    assert f"{data / 'stl10_binary.tar.gz'} was deleted" in output
    assert_unchanged(before, baseline.out, outside.parent)
    assert list(outside.parent.iterdir()) == []
    assert not (tmp_path / "escape.txt").exists() and not (data.parent / "escape.txt").exists()
    assert_cache_holds_nothing(data)


def test_truncated_tarball_without_a_known_checksum(
    baseline: Baseline,
    served: tuple[MisbehavingServer, bytes],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tasks.sources.resolve

    server, tarball = served
    server.files[TAR] = tarball[: len(tarball) // 2]
    monkeypatch.setattr(
        tasks.sources.resolve, "OFFICIAL", tasks.sources.resolve.Checksums(None, members={})
    )
    data = tmp_path / "data"
    code, output = run_cli(baseline.args("--source", server.url(TAR), data=data), capfd)
    assert_user_error(code, output, "The tarball is truncated or corrupt")
    assert "was deleted; the next run downloads it again" in output
    assert_cache_holds_nothing(data)


def _md5(data: bytes) -> str:
    import hashlib

    return hashlib.md5(data).hexdigest()


# -- a features file that is not ours where the cache expects ours -----------------------------


def _foreign_features(path: Path) -> None:
    """A 512-d feature file of another model, without image-search metadata."""
    emb = np.zeros((90, 512), dtype=np.float32)
    table = pa.table(
        {
            "image_id": pa.array(np.arange(90), type=pa.int64()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), 512),
        }
    )
    pq.write_table(table.replace_schema_metadata({b"model": b"clip-vit-b32"}), path)


def test_foreign_features_file_is_refused_not_overwritten(
    baseline: Baseline, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(baseline.out, out)
    _foreign_features(out / "features" / "index.parquet")
    before = snapshot(out)
    code, output = run_cli(baseline.args(out=out), capfd)
    assert_user_error(code, output, str(out / "features" / "index.parquet"))
    assert_unchanged(before, out)


def test_features_of_another_model_of_ours_are_recomputed(
    baseline: Baseline, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Our own file from other weights is a stale cache entry: replaced, never used."""
    out = tmp_path / "out"
    shutil.copytree(baseline.out, out)
    path = out / "features" / "index.parquet"
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"image_search"])
    stale = {**meta, "key": "another-model", "weights": "imagenet"}
    table = table.replace_schema_metadata({b"image_search": json.dumps(stale).encode()})
    pq.write_table(table, path)
    code, output = run_cli(baseline.args(out=out), capfd)
    assert code == 0, output[-3000:]
    assert json.loads(pq.read_schema(path).metadata[b"image_search"]) == meta
    got, want = pq.read_table(path), pq.read_table(baseline.out / "features" / "index.parquet")
    assert got.schema.equals(want.schema, check_metadata=True) and got.num_rows == want.num_rows
    assert got.column("image_id").equals(want.column("image_id"))


# -- real processes: exit codes, stderr, a full disk -----------------------------------------


def test_bad_input_in_real_processes(baseline: Baseline, runner: Runner, tmp_path: Path) -> None:
    before = snapshot(baseline.data, baseline.out)
    bad = runner.run(*baseline.args("--source", "ftp://example.org/x"), data=baseline.data)
    assert bad.rc == 1
    assert "image-search: error: Unsupported source 'ftp://example.org/x'" in bad.err()
    assert "Traceback" not in bad.err() + bad.out()
    assert latest_flow_run().state.is_failed()
    param = runner.run(*baseline.args("--k", "-1"), data=baseline.data)
    assert param.rc == 2
    assert "image-search: error: invalid parameters:\n  --k = -1: Input should be" in param.err()
    assert "Traceback" not in param.err() + param.out()
    assert_unchanged(before, baseline.data, baseline.out)


def _file_size_limit(limit: int) -> object:
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_disk_full_while_writing_outputs(
    baseline: Baseline, runner: Runner, tmp_path: Path
) -> None:
    """A new seed means new random weights: the first write is a part of new embeddings (about
    4 MiB). Under a 256 KiB file-size limit it fails, and every output of the finished run (and
    every embedding already stored) stays as it was."""
    out = tmp_path / "out"
    shutil.copytree(baseline.out, out)
    data = tmp_path / "data"
    shutil.copytree(baseline.data, data)
    assert (out / "samples.png").stat().st_size > 256 << 10
    before = snapshot(out, data)
    proc = runner.run(
        *baseline.args("--seed", "1", data=data, out=out),
        data=data,
        preexec=_file_size_limit(256 << 10),  # type: ignore[arg-type]
    )
    err = proc.err()
    assert proc.rc == 1, err[-3000:]
    # New embeddings go to new parts of the store, the outputs into the staging folder: the
    # files in place stay as they are.
    assert f"image-search: error: Cannot write {out / '.embeddings'}/" in err
    assert "File too large. The outputs already in place were not changed" in err
    assert "free space on that disk" in err and "Traceback" not in err
    state = latest_flow_run().state
    assert state.is_failed() and "File too large" in (state.message or "")
    assert_unchanged(before, out, data)


def test_disk_full_while_downloading(
    baseline: Baseline, runner: Runner, served: tuple[MisbehavingServer, bytes], tmp_path: Path
) -> None:
    server, tarball = served
    server.files[TAR] = tarball + bytes(2 << 20)  # larger than the limit below
    data = tmp_path / "data"
    before = snapshot(baseline.out)
    proc = runner.run(
        *baseline.args("--source", server.url(TAR), data=data),
        data=data,
        preexec=_file_size_limit(1 << 20),  # type: ignore[arg-type]
    )
    err = proc.err()
    assert proc.rc == 1, err[-3000:]
    assert f"image-search: error: Cannot write {data / TAR_PART}: File too large" in err
    assert "Traceback" not in err
    assert_unchanged(before, baseline.out)
    assert_cache_holds_nothing(data)
    assert (data / TAR_PART).stat().st_size == 1 << 20  # kept: the next run resumes from it
