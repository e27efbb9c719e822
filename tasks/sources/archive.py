"""Safe extraction: stream a tarball once, check every member, extract only the wanted files,
MD5-check them, and move them into place only when the whole archive passed."""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path, PurePosixPath

from tasks.errors import ImageSearchError
from tasks.layout import TEMP_PREFIX

CHUNK = 1 << 20


def member_problem(member: tarfile.TarInfo, dest_dir: Path) -> str | None:
    """Why extracting ``member`` into ``dest_dir`` would be unsafe, or None.

    Python's own ``tarfile.data_filter`` (PEP 706) judges paths (absolute, ``..``, outside the
    destination) and special files; we also refuse every link, since STL-10 has none.
    """
    if member.issym() or member.islnk():
        return f"is a link to {member.linkname!r}"
    name = member.name
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "contains '..'"
    data_filter = getattr(tarfile, "data_filter", None)
    if data_filter is not None:
        try:
            data_filter(member, str(dest_dir))
        except tarfile.FilterError as exc:
            return str(exc)
    elif member.isdev() or member.isfifo():  # pragma: no cover - Python without PEP 706
        return "is a device or FIFO"
    return None


def extract_members(
    tarball: Path,
    dest_dir: Path,
    members: dict[str, str | None],
    optional: frozenset[str] = frozenset(),
) -> dict[str, Path]:
    """Extract just the named members (by base name) of ``tarball`` into ``dest_dir``.

    The whole tarball is refused if any member would be unsafe. Each wanted file is MD5-checked
    while it is written to a temporary name; all are renamed into place only after the whole
    archive passed. Members named in ``optional`` may be absent. Returns base name -> path.
    """
    found: dict[str, Path] = {}
    staged: list[tuple[Path, Path]] = []
    try:
        _extract_pass(tarball, dest_dir, members, found, staged)
        for tmp, target in staged:
            os.replace(tmp, target)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    missing = sorted(set(members) - set(found) - optional)
    if missing:
        raise ImageSearchError(f"{tarball} holds no {', '.join(missing)}; it is not STL-10.")
    return found


def _extract_pass(
    tarball: Path,
    dest_dir: Path,
    members: dict[str, str | None],
    found: dict[str, Path],
    staged: list[tuple[Path, Path]],
) -> None:
    """One streaming pass over ``tarball``: check every member, stage the wanted ones."""
    try:
        with tarfile.open(tarball, mode="r|gz") as tar:
            for member in tar:
                problem = member_problem(member, dest_dir)
                if problem:
                    raise ImageSearchError(
                        f"Refusing {tarball}: member {member.name!r} {problem} and would land "
                        f"outside {dest_dir}. The tarball is not a genuine STL-10 archive."
                    )
                base = PurePosixPath(member.name).name
                if base not in members or not member.isfile() or base in found:
                    continue
                src = tar.extractfile(member)
                if src is None:  # pragma: no cover - isfile() guarantees a stream
                    continue
                dest_dir.mkdir(parents=True, exist_ok=True)
                tmp = dest_dir / f"{TEMP_PREFIX}{base}.extract"
                staged.append((tmp, dest_dir / base))
                digest = hashlib.md5()
                with src, open(tmp, "wb") as out:
                    while block := src.read(CHUNK):
                        digest.update(block)
                        out.write(block)
                os.chmod(tmp, 0o644)
                want = members[base]
                if want is not None and digest.hexdigest() != want:
                    raise ImageSearchError(
                        f"{base} in {tarball} has MD5 {digest.hexdigest()}, expected {want}."
                    )
                found[base] = dest_dir / base
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ImageSearchError(
            f"Cannot read {tarball}: {exc}. The tarball is truncated or corrupt; delete it and "
            f"download again."
        ) from exc
