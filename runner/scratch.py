"""Removing a run's scratch folder, whatever the run left in it.

A submission shapes its scratch: a tree 1,200 folders deep (``shutil.rmtree`` recurses and
raises RecursionError), paths longer than PATH_MAX, folders without permissions.
``remove_tree`` walks with one open folder at a time, relative to it, without recursion,
within a depth and an entry cap, and never raises on content: what it cannot remove is
logged and left. Nothing is mounted there to undo: the run's disk lives in its
supervisor's own mount namespace (``runner/supervise.py``); a mount point found anyway is
not entered (what it holds is not the scratch's) and is left, said.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("runner.scratch")

# Far deeper and larger than any honest run's files (the run's disk holds at most
# supervise.DISK_INODES of them); the caps bound the time a hostile tree can take.
MAX_DEPTH = 10_000
MAX_ENTRIES = 1_000_000
OPEN_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path: str | os.PathLike[str], max_depth: int = MAX_DEPTH,
                max_entries: int = MAX_ENTRIES) -> bool:
    """Remove ``path`` and what it holds; return whether it is gone.

    Never raises on what the tree holds: what is left is said in one warning line.
    """
    # ``path`` itself, if a link, is removed, never followed.
    top = os.path.abspath(path)
    try:
        if not os.path.lexists(top):
            return True
        if not os.path.isdir(top) or os.path.islink(top):
            os.unlink(top)
            return True
        problem = _remove_folder(top, max_depth, max_entries)
    except OSError as error:
        problem = str(error)
    if problem is not None:
        logger.warning("scratch: left %r behind: %s", top, problem)
        return False
    return True


def _remove_folder(top: str, max_depth: int, max_entries: int) -> str | None:
    """Empty and remove ``top`` depth first; return what stopped it, or None."""
    budget = _Budget(max_entries, os.lstat(top).st_dev)
    folder = os.open(top, OPEN_FOLDER)
    # Per level below top: the folder's name and its parent's subfolders still to visit.
    stack: list[tuple[str, list[str]]] = []
    try:
        pending = budget.empty_of_files(folder)
        while True:
            if pending and len(stack) < max_depth:
                name = pending.pop()
                child = _enter(folder, name)
                stack.append((name, pending))
                os.close(folder)
                folder = child
                pending = budget.empty_of_files(folder)
                continue
            if pending:
                return f"deeper than {max_depth} folders"
            if not stack:
                break
            name, pending = stack.pop()
            parent = os.open("..", OPEN_FOLDER, dir_fd=folder)
            os.close(folder)
            folder = parent
            os.rmdir(name, dir_fd=folder)
            budget.spend()
    except (OSError, _OverBudget) as error:
        return str(error)
    finally:
        os.close(folder)
    os.rmdir(top)
    return None


class _OverBudget(Exception):
    pass


class _Budget:
    """The entries removed so far, against the cap, and the device the tree must stay on."""

    def __init__(self, max_entries: int, device: int):
        self.left, self.max_entries, self.device = max_entries, max_entries, device

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise _OverBudget(f"more than {self.max_entries} entries")

    def empty_of_files(self, folder: int) -> list[str]:
        """Unlink every non-folder in ``folder``; return its subfolders."""
        subfolders = []
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.is_dir(follow_symlinks=False):
                    os.unlink(entry.name, dir_fd=folder)
                    self.spend()
                elif entry.stat(follow_symlinks=False).st_dev == self.device:
                    subfolders.append(entry.name)
                else:
                    raise OSError(f"{entry.name!r} is a mount point")
        return subfolders


def _enter(folder: int, name: str) -> int:
    try:
        return os.open(name, OPEN_FOLDER, dir_fd=folder)
    except PermissionError:
        # A run may leave a folder it made unreadable; its owner (or root) may open it again.
        os.chmod(name, 0o700, dir_fd=folder)
        return os.open(name, OPEN_FOLDER, dir_fd=folder)
