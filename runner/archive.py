"""Folders as tar bytes: deterministic packing (content hash) and refusing unpacking.

Bytes travel between machines that share no paths (a Dask worker, a remote host); what
arrives may come from a machine running untrusted code, so unpacking accepts regular
files and folders only, each inside the destination.
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
    bytes (and their hash) depend on names, modes and contents only. Symbolic links are
    followed; names in ``SKIPPED_NAMES`` and ``skip`` are left out at any depth.
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
            info.mode = stat.S_IMODE(path.stat().st_mode)
            if path.is_dir():
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = path.stat().st_size
                with open(path, "rb") as handle:
                    tar.addfile(info, handle)
    return buffer.getvalue()


def _walk(root: Path, skipped: set[str]) -> list[Path]:
    found = []
    for entry in sorted(root.iterdir()):
        if entry.name in skipped:
            continue
        found.append(entry)
        if entry.is_dir():
            found.extend(_walk(entry, skipped))
    return found


def fingerprint(folder: str | os.PathLike[str], skip: Iterable[str] = ()) -> tuple:
    """Names, sizes and modification times of what ``pack`` would take: cheap change check."""
    root = Path(folder)
    skipped = set(SKIPPED_NAMES) | set(skip)
    return tuple((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
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
