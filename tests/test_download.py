"""Download, verify and extract against a local HTTP server serving generated STL-10 archives."""

from __future__ import annotations

import hashlib
import socket
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tasks.errors import ImageSearchError, TransientNetworkError, option_name
from tasks.sources.archive import extract_members
from tasks.sources.cache import default_data_dir
from tasks.sources.download import download_task, is_transient
from tasks.sources.fetch import download_file
from tasks.sources.resolve import download_and_extract
from tasks.sources.stl10 import IMAGE_BYTES, OFFICIAL, OFFICIAL_URL, Checksums, read_all_images
from tasks.types import DataRef
from tests.conftest import FakeStl10, MisbehavingServer, make_tarball

TAR = "/stl10/stl10_binary.tar.gz"


def test_official_source_is_the_stanford_url_with_published_sums() -> None:
    assert OFFICIAL_URL == "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
    assert OFFICIAL.tarball == "91f7769df0f17e558f3565bffb0c7dfb"
    assert OFFICIAL.members["unlabeled_X.bin"] == "5242ba1fed5e4be9e1e742405eb56ca4"


def test_data_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IMAGE_SEARCH_DATA", str(tmp_path / "cache"))
    assert default_data_dir() == tmp_path / "cache"
    monkeypatch.delenv("IMAGE_SEARCH_DATA")
    assert "image-search" in str(default_data_dir())


def test_download_verify_extract_decode(
    http_server: MisbehavingServer, fake_stl10: FakeStl10, tmp_path: Path
) -> None:
    http_server.files[TAR] = fake_stl10.tarball
    ref = download_and_extract(http_server.url(TAR), tmp_path, checksums=fake_stl10.checksums())
    assert Path(ref.uri) == tmp_path / "stl10_binary" / "unlabeled_X.bin"
    assert ref.rows == len(fake_stl10.images)
    assert ref.fingerprint == fake_stl10.bin_md5
    assert Path(ref.uri).read_bytes() == fake_stl10.unlabeled
    np.testing.assert_array_equal(read_all_images(ref.uri), fake_stl10.images)
    # Only the search's file and those of the labelled sets are extracted (what the archive
    # has of them); no temporary or partial files remain.
    names = sorted(p.name for p in (tmp_path / "stl10_binary").iterdir())
    assert names == ["class_names.txt", "train_y.bin", "unlabeled_X.bin"]
    assert not list(tmp_path.glob("*.part"))


def test_verified_cache_means_no_network(
    http_server: MisbehavingServer, fake_stl10: FakeStl10, tmp_path: Path
) -> None:
    http_server.files[TAR] = fake_stl10.tarball
    download_and_extract(http_server.url(TAR), tmp_path, checksums=fake_stl10.checksums())
    n = len(http_server.requests)
    # A dead URL proves nothing is fetched: the verified cache answers.
    ref = download_and_extract(
        "http://127.0.0.1:9/none.tar.gz", tmp_path, checksums=fake_stl10.checksums()
    )
    assert ref.rows == len(fake_stl10.images)
    assert len(http_server.requests) == n


def test_a_complete_read_only_cache_is_used_without_writing(
    http_server: MisbehavingServer,
    fake_stl10: FakeStl10,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A shared ReadOnlyMany volume that already holds the verified files is enough; one that
    does not is a clear error, not a lock file that cannot be created."""
    http_server.files[TAR] = fake_stl10.tarball
    download_and_extract(http_server.url(TAR), tmp_path, checksums=fake_stl10.checksums())
    # Root ignores permission bits, so the read-only volume is simulated where it is probed.
    monkeypatch.setattr("tasks.sources.cache.is_writable_dir", lambda path: False)

    def no_lock(*args: object, **kwargs: object) -> None:
        raise AssertionError("a read-only cache must not be locked")

    monkeypatch.setattr("tasks.sources.cache.folder_lock", no_lock)
    before = sorted(p.name for p in tmp_path.iterdir())
    ref = download_and_extract(
        "http://127.0.0.1:9/none.tar.gz", tmp_path, checksums=fake_stl10.checksums()
    )
    assert Path(ref.uri).read_bytes() == fake_stl10.unlabeled
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageSearchError, match="is read-only and holds no verified"):
        download_and_extract(http_server.url(TAR), empty, checksums=fake_stl10.checksums())


def test_downloaded_but_not_extracted_tarball_gets_extracted(
    fake_stl10: FakeStl10, tmp_path: Path
) -> None:
    (tmp_path / "stl10_binary.tar.gz").write_bytes(fake_stl10.tarball)
    ref = download_and_extract(
        "http://127.0.0.1:9/unreachable.tar.gz", tmp_path, checksums=fake_stl10.checksums()
    )
    assert Path(ref.uri).read_bytes() == fake_stl10.unlabeled


def test_interrupted_download_resumes_with_range(
    http_server: MisbehavingServer, fake_stl10: FakeStl10, tmp_path: Path
) -> None:
    http_server.files[TAR] = fake_stl10.tarball
    http_server.cut_once[TAR] = [len(fake_stl10.tarball) // 3]
    dest = tmp_path / "x.tar.gz"
    with pytest.raises(TransientNetworkError, match="connection closed after"):
        download_file(http_server.url(TAR), dest, fake_stl10.tar_md5, progress=False)
    assert not dest.exists()  # one attempt per call: the next call continues the .part file
    download_file(http_server.url(TAR), dest, fake_stl10.tar_md5, progress=False)
    assert dest.read_bytes() == fake_stl10.tarball
    ranges = [r for _, r in http_server.requests]
    assert ranges[0] is None
    assert ranges[1] == f"bytes={len(fake_stl10.tarball) // 3}-"


def test_partial_file_from_a_killed_run_is_resumed(
    http_server: MisbehavingServer, fake_stl10: FakeStl10, tmp_path: Path
) -> None:
    http_server.files[TAR] = fake_stl10.tarball
    dest = tmp_path / "x.tar.gz"
    half = len(fake_stl10.tarball) // 2
    (tmp_path / "x.tar.gz.part").write_bytes(fake_stl10.tarball[:half])
    download_file(http_server.url(TAR), dest, fake_stl10.tar_md5, progress=False)
    assert dest.read_bytes() == fake_stl10.tarball
    assert http_server.requests == [(TAR, f"bytes={half}-")]


@pytest.fixture
def fake_official(monkeypatch: pytest.MonkeyPatch, fake_stl10: FakeStl10) -> None:
    """The download task checks the generated archive's sums instead of the official ones."""
    monkeypatch.setattr("tasks.sources.resolve.OFFICIAL", fake_stl10.checksums())
    monkeypatch.setenv("IMAGE_SEARCH_RETRY_BACKOFF", "0.01")


def _download_in_a_flow(source: str, data_dir: Path) -> Any:
    """Run the download task the way the flow does, with Prefect's retries; return its state."""
    from prefect import flow

    @flow
    def fetch() -> DataRef:
        return download_task()(source, str(data_dir))

    return fetch(return_state=True)


@pytest.mark.usefixtures("prefect_harness", "fake_official")
def test_transient_errors_are_retried_by_the_task_alone(
    http_server: MisbehavingServer, fake_stl10: FakeStl10, tmp_path: Path
) -> None:
    http_server.files[TAR] = fake_stl10.tarball
    http_server.fail_status[TAR] = [503, 502]
    http_server.cut_once[TAR] = [len(fake_stl10.tarball) // 3]
    state = _download_in_a_flow(http_server.url(TAR), tmp_path)
    assert state.is_completed(), state.message
    assert Path(state.result().uri).read_bytes() == fake_stl10.unlabeled
    # Two 5xx answers, one cut connection, then the rest with a Range request: 4 requests in
    # 4 task attempts, each attempt exactly one request.
    ranges = [r for _, r in http_server.requests]
    assert ranges == [None, None, None, f"bytes={len(fake_stl10.tarball) // 3}-"]


@pytest.mark.usefixtures("prefect_harness", "fake_official")
def test_user_errors_and_bugs_are_not_retried(
    http_server: MisbehavingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _download_in_a_flow(http_server.url("/missing.tar.gz"), tmp_path)
    assert state.is_failed()
    assert len(http_server.requests) == 1  # HTTP 404: the user's to fix, asked once
    calls: list[str] = []

    def buggy(source: str, data_dir: Path | None = None) -> DataRef:
        calls.append(source)
        raise KeyError("a bug, not the network")

    monkeypatch.setattr("tasks.sources.resolve.download_and_extract", buggy)
    state = _download_in_a_flow("sample", tmp_path)
    assert state.is_failed() and calls == ["sample"]


def test_retry_delays_follow_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGE_SEARCH_RETRY_BACKOFF", "3")
    assert download_task().retry_delay_seconds == [3.0, 6.0, 12.0, 24.0, 48.0]
    assert is_transient.__name__ == download_task().retry_condition_fn.__name__  # type: ignore[union-attr]


def test_the_download_stops_at_the_expected_size(
    http_server: MisbehavingServer, tmp_path: Path
) -> None:
    http_server.files[TAR] = b"x" * 5000
    http_server.hide_length.add(TAR)
    dest = tmp_path / "x.tar.gz"
    with pytest.raises(ImageSearchError, match="sent more than the expected 4,096 bytes"):
        download_file(http_server.url(TAR), dest, None, max_bytes=4096, progress=False)
    assert not dest.exists() and not (tmp_path / "x.tar.gz.part").exists()


def test_wrong_checksum_never_reaches_the_cache(
    http_server: MisbehavingServer, fake_stl10: FakeStl10, tmp_path: Path
) -> None:
    http_server.files[TAR] = fake_stl10.tarball
    bad = Checksums(tarball="0" * 32, members={})
    with pytest.raises(ImageSearchError, match=r"has MD5 [0-9a-f]{32}, expected 0{32}"):
        download_and_extract(http_server.url(TAR), tmp_path, checksums=bad)
    assert not (tmp_path / "stl10_binary.tar.gz").exists()
    assert not (tmp_path / "stl10_binary.tar.gz.part").exists()
    assert not (tmp_path / "stl10_binary").exists() or not any(
        (tmp_path / "stl10_binary").iterdir()
    )


def test_truncated_tarball_is_a_clear_error(fake_stl10: FakeStl10, tmp_path: Path) -> None:
    truncated = tmp_path / "stl10_binary.tar.gz"
    truncated.write_bytes(fake_stl10.tarball[: len(fake_stl10.tarball) // 2])
    sums = Checksums(tarball=None, members={"unlabeled_X.bin": fake_stl10.bin_md5})
    with pytest.raises(ImageSearchError, match="truncated or corrupt"):
        download_and_extract(str(truncated), tmp_path / "cache", checksums=sums)
    assert not (tmp_path / "cache" / "stl10_binary" / "unlabeled_X.bin").exists()
    # With the official sums, the MD5 check stops it even before extraction.
    with pytest.raises(ImageSearchError, match="expected 91f7769df0f17e558f3565bffb0c7dfb"):
        download_and_extract(str(truncated), tmp_path / "cache2")


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("../evil.bin", tarfile.REGTYPE, "contains '..'"),
        ("/etc/evil.bin", tarfile.REGTYPE, "absolute path"),
        ("stl10_binary/link", tarfile.SYMTYPE, "is a link"),
        ("stl10_binary/hard", tarfile.LNKTYPE, "is a link"),
    ],
)
def test_members_escaping_the_folder_are_refused(
    tmp_path: Path, name: str, kind: bytes, message: str
) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = "/etc/passwd" if kind != tarfile.REGTYPE else ""
    data = bytes(IMAGE_BYTES)
    tarball = tmp_path / "evil.tar.gz"
    tarball.write_bytes(make_tarball({"stl10_binary/unlabeled_X.bin": data}, [info]))
    dest = tmp_path / "out"
    with pytest.raises(ImageSearchError, match=message):
        extract_members(tarball, dest, {"unlabeled_X.bin": None})
    assert not (tmp_path / "evil.bin").exists()
    assert not dest.exists() or not any(dest.iterdir())


def test_http_404_names_the_url(http_server: MisbehavingServer, tmp_path: Path) -> None:
    url = http_server.url("/missing.tar.gz")
    with pytest.raises(ImageSearchError, match=r"missing\.tar\.gz answered HTTP 404"):
        download_file(url, tmp_path / "x", None, progress=False)
    assert len(http_server.requests) == 1  # a 404 is not retried


def test_offline_error_names_url_cache_path_and_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/stl10_binary.tar.gz"
    with pytest.raises(TransientNetworkError) as info:  # refused: the task tries again later
        download_and_extract(url, tmp_path)
    text = info.value.worded(option_name)
    assert url in text
    assert str(tmp_path / "stl10_binary.tar.gz") in text
    assert "--source sample" in text


def test_unknown_scheme_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ImageSearchError, match="scheme 'ftp' is not one of http, https, file"):
        download_and_extract("ftp://example.org/stl10.tar.gz", tmp_path)
    with pytest.raises(ImageSearchError, match="neither a URL, an existing file or folder"):
        download_and_extract(str(tmp_path / "nope.tar.gz"), tmp_path)


def test_file_url_local_tarball_folder_and_bin_sources(
    fake_stl10: FakeStl10, tmp_path: Path
) -> None:
    sums = fake_stl10.checksums()
    tarball = tmp_path / "mirror" / "stl10_binary.tar.gz"
    tarball.parent.mkdir()
    tarball.write_bytes(fake_stl10.tarball)
    ref = download_and_extract(tarball.as_uri(), tmp_path / "c1", checksums=sums)
    assert Path(ref.uri).read_bytes() == fake_stl10.unlabeled
    ref = download_and_extract(str(tarball), tmp_path / "c2", checksums=sums)
    assert Path(ref.uri).read_bytes() == fake_stl10.unlabeled
    # A folder with the extracted file is used in place.
    folder = tmp_path / "c2" / "stl10_binary"
    ref = download_and_extract(str(folder), tmp_path / "c3", checksums=sums)
    assert Path(ref.uri) == folder / "unlabeled_X.bin"
    # With the official sums, a folder holding a different file is refused with the way out.
    with pytest.raises(ImageSearchError, match=r"pass the \.bin file itself"):
        download_and_extract(str(folder), tmp_path / "c4")
    ref = download_and_extract(str(folder / "unlabeled_X.bin"), tmp_path / "c4")
    assert ref.rows == len(fake_stl10.images)


def test_unlabeled_member_checksum_mismatch(fake_stl10: FakeStl10, tmp_path: Path) -> None:
    tarball = tmp_path / "t.tar.gz"
    tarball.write_bytes(fake_stl10.tarball)
    sums = Checksums(tarball=fake_stl10.tar_md5, members={"unlabeled_X.bin": "f" * 32})
    with pytest.raises(ImageSearchError, match=r"unlabeled_X\.bin in .* has MD5"):
        download_and_extract(str(tarball), tmp_path / "cache", checksums=sums)
    assert not (tmp_path / "cache" / "stl10_binary" / "unlabeled_X.bin").exists()


def test_sample_source(tmp_path: Path) -> None:
    ref = download_and_extract("sample", tmp_path)
    assert ref.rows >= 2000
    assert Path(ref.uri).stat().st_size == ref.rows * IMAGE_BYTES
    digest = hashlib.sha256(Path(ref.uri).read_bytes()).hexdigest()
    assert ref.fingerprint == f"sample-{digest[:12]}"
