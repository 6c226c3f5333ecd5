"""Folders as tar bytes: deterministic packing (content hash) and refusing unpacking.

Bytes travel between machines that share no paths (a Dask worker, a remote host); what
arrives may come from a machine running untrusted code, so unpacking accepts regular
files and folders only, each inside the destination. Packing takes them only too: a
link in a submission would ship what it points to (``/etc/shadow``), a FIFO would block.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import posixpath
import stat
import tarfile
from collections.abc import Iterable
from pathlib import Path

# Never shipped: byte-code caches differ between Pythons, git history is not the kit.
SKIPPED_NAMES = ("__pycache__", ".git")


class UnsafeArchiveError(ValueError):
    """A tar member that would land outside its folder, or is not a file or folder."""


def pack(folder: str | os.PathLike[str], skip: Iterable[str] = ()) -> bytes:
    """Return the uncompressed tar of ``folder``'s content, the same bytes for the same content.

    Names are relative to ``folder``, sorted, with mtime, owner and group zeroed, so the
    bytes (and their hash) depend on names, modes and contents only. Names in
    ``SKIPPED_NAMES`` and ``skip`` are left out at any depth; a symbolic link or a special
    file anywhere else raises ``UnsafeArchiveError`` naming it (nothing is followed).
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    skipped = set(SKIPPED_NAMES) | set(skip)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in _walk(root, skipped):
            name = path.relative_to(root).as_posix()
            info = tarfile.TarInfo(name)
            mode = path.lstat().st_mode
            info.mode = stat.S_IMODE(mode)
            if stat.S_ISDIR(mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            # O_NOFOLLOW, O_NONBLOCK: a link or FIFO put in place since the walk is refused.
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError as error:
                raise UnsafeArchiveError(f"{name}: cannot be packed ({error.strerror})") from None
            with os.fdopen(fd, "rb") as handle:
                found = os.fstat(fd)
                if not stat.S_ISREG(found.st_mode):
                    raise _refused(name)
                info.size = found.st_size
                tar.addfile(info, handle)
    return buffer.getvalue()


def _refused(name: str) -> UnsafeArchiveError:
    # The name inside the folder only: the dispatcher's paths are not the participant's.
    return UnsafeArchiveError(f"{name} is a symbolic link or a special file: only folders "
                              "and regular files are packed")


def _walk(root: Path, skipped: set[str], top: Path | None = None) -> list[Path]:
    """Entries under ``root``, sorted, parents first; links and special files refused."""
    top = top or root
    found = []
    for entry in sorted(root.iterdir()):
        if entry.name in skipped:
            continue
        mode = entry.lstat().st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise _refused(entry.relative_to(top).as_posix())
        found.append(entry)
        if stat.S_ISDIR(mode):
            found.extend(_walk(entry, skipped, top))
    return found


def fingerprint(folder: str | os.PathLike[str], skip: Iterable[str] = ()) -> tuple:
    """Names, sizes and modification times of what ``pack`` would take: cheap change check."""
    root = Path(folder)
    skipped = set(SKIPPED_NAMES) | set(skip)
    return tuple((p.relative_to(root).as_posix(), p.lstat().st_size, p.lstat().st_mtime_ns)
                 for p in _walk(root, skipped))


def digest(data: bytes) -> str:
    """The content hash naming a packed folder."""
    return hashlib.sha256(data).hexdigest()


def compress(data: bytes) -> bytes:
    """gzip ``data`` quickly and reproducibly (no timestamp in the header)."""
    return gzip.compress(data, compresslevel=1, mtime=0)


def decompress(data: bytes) -> bytes:
    """Return ``data`` un-gzipped when it is gzip, as it is otherwise."""
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def unpack(data: bytes, destination: str | os.PathLike[str]) -> None:
    """Unpack tar ``data`` (plain or gzip) into ``destination``, refusing unsafe members.

    Every member is checked before anything is written: absolute names, ``..``
    components, links, devices and fifos raise ``UnsafeArchiveError``.
    """
    data = decompress(data)
    destination = Path(destination)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        members = tar.getmembers()
        for member in members:
            check_member(member)
        destination.mkdir(parents=True, exist_ok=True)
        # The "data" filter repeats the checks and drops set-id bits and odd modes.
        tar.extractall(destination, members=members, filter="data")


def check_member(member: tarfile.TarInfo) -> None:
    """Raise ``UnsafeArchiveError`` unless ``member`` is a file or folder inside its root."""
    name = member.name
    normal = posixpath.normpath(name)
    if (
        name.startswith(("/", "\\"))
        or posixpath.isabs(normal)
        or normal == ".."
        or normal.startswith("../")
        or ".." in name.replace("\\", "/").split("/")
    ):
        raise UnsafeArchiveError(f"tar member {name!r} escapes its folder")
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"tar member {name!r} is not a regular file or folder")
