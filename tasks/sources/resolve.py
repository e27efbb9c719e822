"""Turn any form of STL-10 into a verified ``unlabeled_X.bin`` and a reference to it: a URL
(downloaded into the data cache), a tarball, a folder, a ``.bin`` file, or the sample.

One attempt per call (the ``.part`` file resumes); retrying is the download task's
(:mod:`tasks.sources.download`), for :class:`TransientNetworkError` only.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tasks.errors import ImageSearchError, param
from tasks.fingerprints import sampled_fingerprint
from tasks.sources.archive import extract_members
from tasks.sources.cache import data_lock, default_data_dir, verify_file
from tasks.sources.fetch import download_file
from tasks.sources.located import locate, not_a_source
from tasks.sources.sample import ensure_sample
from tasks.sources.stl10 import (
    EXTRACT_DIR,
    LABELLED,
    LABELLED_SIZES,
    OFFICIAL,
    OPTIONAL,
    TARBALL_NAME,
    UNLABELED,
    WANTED,
    Checksums,
    dataset_ref,
    stl10_form,
)
from tasks.types import DataRef

log = logging.getLogger(__name__)


def download_and_extract(
    source: str, data_dir: Path | None = None, *, checksums: Checksums | None = None
) -> DataRef:
    """Make ``unlabeled_X.bin`` available from ``source`` and return a reference to it.

    ``source``: any form of STL-10 the registry recognises (see
    :func:`tasks.sources.stl10.stl10_form`): an http(s) URL of the tarball, a local tarball
    (also as a ``file://`` URL), a folder with the extracted files, a ``.bin`` file in the STL-10
    binary format (used as is, not checksummed), or ``sample``. A verified copy in the cache
    means no network access at all. One download attempt per call:
    :class:`TransientNetworkError` means "call again later".
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    checksums = OFFICIAL if checksums is None else checksums
    located = locate(source)
    form = stl10_form(located)
    if form is None:
        if located.path is not None and located.path.is_dir():
            return _from_folder(located.path, data_dir, checksums)  # names what is missing
        raise not_a_source(located)
    if form == "sample":
        return ensure_sample(data_dir)
    if form == "url":
        return _from_url(located.text, data_dir, checksums)
    path = located.path
    assert path is not None  # every other form is local
    if form == "folder":
        return _from_folder(path, data_dir, checksums)
    if form == "bin":
        return dataset_ref(path, sampled_fingerprint(path))
    return _from_tarball(path, data_dir, checksums)


def _cached(data_dir: Path, checksums: Checksums) -> DataRef | None:
    target = data_dir / EXTRACT_DIR / UNLABELED
    if not target.exists():
        return None
    try:
        digest = verify_file(target, checksums.members.get(UNLABELED), data_dir)
    except ImageSearchError:
        log.warning("cached %s failed verification; it will be replaced", target)
        return None
    return dataset_ref(target, digest)


def _read_only(data_dir: Path) -> ImageSearchError:
    return ImageSearchError(
        f"Data cache {str(data_dir)!r} is read-only and holds no verified {UNLABELED}; put "
        f"the verified files there or choose a writable {param('data_dir')}."
    )


def _extract_into_cache(tarball: Path, data_dir: Path, checksums: Checksums) -> DataRef:
    wanted = {name: checksums.members.get(name) for name in WANTED}
    found = extract_members(tarball, data_dir / EXTRACT_DIR, wanted, OPTIONAL)
    target = found[UNLABELED]
    return dataset_ref(target, verify_file(target, checksums.members.get(UNLABELED), data_dir))


def _from_url(url: str, data_dir: Path, checksums: Checksums) -> DataRef:
    with data_lock(data_dir, (EXTRACT_DIR,)) as writable:
        if (ref := _cached(data_dir, checksums)) is not None:
            return ref
        if not writable:
            raise _read_only(data_dir)
        tarball = data_dir / TARBALL_NAME
        if tarball.exists():
            try:
                verify_file(tarball, checksums.tarball, data_dir)
            except ImageSearchError:
                log.warning("cached %s failed verification; downloading it again", tarball)
                tarball.unlink()
        if not tarball.exists():
            download_file(url, tarball, checksums.tarball, max_bytes=checksums.max_tarball_bytes)
        try:
            return _extract_into_cache(tarball, data_dir, checksums)
        except ImageSearchError as exc:
            # The cache's own copy is useless; keeping it would fail every later run the same way.
            tarball.unlink(missing_ok=True)
            raise ImageSearchError(
                f"{exc} The downloaded {tarball} was deleted; the next run downloads it again."
            ) from exc


def _from_tarball(tarball: Path, data_dir: Path, checksums: Checksums) -> DataRef:
    with data_lock(data_dir, (EXTRACT_DIR,)) as writable:
        if (ref := _cached(data_dir, checksums)) is not None:
            return ref
        if not writable:
            raise _read_only(data_dir)
        verify_file(tarball, checksums.tarball, data_dir)
        return _extract_into_cache(tarball, data_dir, checksums)


def _from_folder(folder: Path, data_dir: Path, checksums: Checksums) -> DataRef:
    for candidate in (folder / UNLABELED, folder / EXTRACT_DIR / UNLABELED):
        if candidate.is_file():
            with data_lock(data_dir, (EXTRACT_DIR,)):
                digest = verify_file(candidate, checksums.members.get(UNLABELED), data_dir)
            return dataset_ref(candidate, digest)
    tarball = folder / TARBALL_NAME
    if tarball.is_file():
        return _from_tarball(tarball, data_dir, checksums)
    raise ImageSearchError(
        f"Folder {folder} holds neither {UNLABELED} nor {TARBALL_NAME}; point {param('source')} at "
        f"the folder that does."
    )


def labelled_folder(
    folder: Path, data_dir: Path | None = None, checksums: Checksums | None = None
) -> Path:
    """``folder`` checked to hold STL-10's labelled sets. Files of the official size are
    MD5-verified; files of another size are taken as STL-10-format data, like a ``.bin``."""
    checksums = OFFICIAL if checksums is None else checksums
    missing = [name for name in LABELLED if not (folder / name).is_file()]
    if missing:
        raise ImageSearchError(
            f"Folder {folder} lacks {', '.join(missing)}: the labelled sets come in the STL-10 "
            f"tarball (stl10_binary/); point {param('source')} at the tarball, its URL or the "
            f"folder "
            f"holding train_X.bin, train_y.bin, test_X.bin and test_y.bin."
        )
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    for name, size in LABELLED_SIZES.items():
        path = folder / name
        if path.stat().st_size == size and checksums.members.get(name):
            with data_lock(data_dir) as writable:  # the MD5 memo lives in the data cache
                if writable:
                    verify_file(path, checksums.members[name], data_dir)
    return folder
