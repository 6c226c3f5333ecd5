"""The event's submission folders: which ones are ready to run, and adding new ones.

Intake rule (what the dispatcher takes from ``submissions_dir``):

- only real folders directly inside it, named like ``VALID_NAME``; a symbolic link is
  refused (said once, in the log), whatever it points to; hidden names are staging areas;
- only complete folders: one that arrived by a rename (``submit``, or ``mv`` on the same
  file system: a rename is atomic) at once; one created in place (``cp -r``, ``rsync``,
  an upload) once nothing in it changed for ``QUIET_SECONDS``: its newest change time
  (ctime, which ``cp -a`` cannot set back) is that old, or, whatever the clocks say, its
  entries' count, sizes and ctimes stayed the same that long. A folder still being copied
  is never run, so never blamed on its author.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Iterable
from pathlib import Path

from runner.config import EventConfig
from runner.ledger import Ledger

logger = logging.getLogger("runner.submissions")

# A name ramp-test and every filesystem accept, and that cannot climb out of the folder.
VALID_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Names become folder and file names, with prefixes and suffixes (the run's scratch folder,
# its log): far under the 255 bytes a file name may take.
MAX_NAME_LENGTH = 64
NAME_RULE = f"letters, digits, '_', '-' and '.', at most {MAX_NAME_LENGTH} characters"


def valid_name(name: str) -> bool:
    """Whether ``name`` may name a submission: matched whole (a trailing newline is not a
    name), and bounded."""
    return len(name) <= MAX_NAME_LENGTH and VALID_NAME.fullmatch(name) is not None
# How long a folder created in place must stay unchanged before it is taken in.
QUIET_SECONDS = 1.0


class Intake:
    """Decides which names in ``submissions_dir`` are submissions ready to run.

    It remembers every name it has judged, so that a wake-up costs one ``stat`` of the
    folder, and a listing (names only) only when the folder changed.
    """

    def __init__(self, submissions_dir: str | Path, known: Iterable[str] = ()):
        self.folder = Path(submissions_dir)
        self.known = set(known)
        # Created in place and not quiet yet: name -> (signature, monotonic time first seen).
        self.pending: dict[str, tuple[tuple[int, int, int], float]] = {}
        self.moved_in: set[str] = set()
        self._listed_mtime: int | None = None

    def arrived_by_rename(self, name: str) -> None:
        """``name`` was renamed into the folder (a watch saw it): complete at once."""
        self.moved_in.add(name)

    def ready(self) -> list[str]:
        """Names that became ready since the last call, oldest judgement first."""
        candidates = [*self._listing_changes(), *self.pending]
        ready = [name for name in dict.fromkeys(candidates) if self._judge(name)]
        self.known.update(ready)
        return ready

    def _listing_changes(self) -> list[str]:
        try:
            mtime = os.stat(self.folder).st_mtime_ns
        except FileNotFoundError:
            return []
        # A timestamp newer than a second may hide a second change within its tick.
        recent = time.time_ns() - mtime < 1_000_000_000
        if mtime == self._listed_mtime and not recent:
            return []
        self._listed_mtime = mtime
        with os.scandir(self.folder) as entries:
            return sorted(e.name for e in entries
                          if e.name not in self.known and e.name not in self.pending)

    def next_judgement(self) -> float | None:
        """Seconds until a folder not quiet yet may be (None when none waits)."""
        if not self.pending:
            return None
        now_ns, now = time.time_ns(), time.monotonic()
        return max(0.0, min(min((QUIET_SECONDS * 1e9 - (now_ns - signature[2])) / 1e9,
                                QUIET_SECONDS - (now - seen))
                            for signature, seen in self.pending.values()))

    def _judge(self, name: str) -> bool:
        """True when ``name`` is ready; refused names are remembered and said once."""
        if name.startswith("."):
            return False  # staging, e.g. submit's .<name>.incoming
        path = self.folder / name
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            self.pending.pop(name, None)
            return False
        if stat.S_ISLNK(info.st_mode):
            self._refuse(name, f"is a symbolic link (to {os.readlink(path)}); only real "
                               "folders are run: copy the folder in, or use submit")
            return False
        if not stat.S_ISDIR(info.st_mode):
            self.known.add(name)  # a stray file: not a submission, nothing to say
            return False
        if not valid_name(name):
            self._refuse(name, f"is not a valid submission name ({NAME_RULE})")
            return False
        if name in self.moved_in:
            self.moved_in.discard(name)
            self.pending.pop(name, None)
            return True
        signature = _signature(path)
        now = time.monotonic()
        seen = self.pending.get(name)
        quiet = (time.time_ns() - signature[2] >= QUIET_SECONDS * 1e9
                 or (seen is not None and seen[0] == signature
                     and now - seen[1] >= QUIET_SECONDS))
        if quiet:
            self.pending.pop(name, None)
            return True
        if seen is None or seen[0] != signature:
            self.pending[name] = (signature, now)
        return False

    def _refuse(self, name: str, why: str) -> None:
        self.known.add(name)
        self.pending.pop(name, None)
        logger.warning("submission %s in %s %s", name, self.folder, why)


def _signature(folder: Path) -> tuple[int, int, int]:
    """(entries, total size, newest ctime) of a folder's tree, links not followed."""
    count, size, newest = 0, 0, os.lstat(folder).st_ctime_ns
    for root, dirs, files in os.walk(folder):
        for entry in (*dirs, *files):
            try:
                info = os.lstat(os.path.join(root, entry))
            except FileNotFoundError:
                continue  # removed while we looked: the next look sees a change
            count, size, newest = count + 1, size + info.st_size, max(newest, info.st_ctime_ns)
    return count, size, newest


def submit(config: EventConfig, source: str | Path, name: str | None = None) -> str:
    """Copy the submission folder ``source`` into the event as ``name`` and queue it."""
    source = Path(source)
    name = name or source.name
    if not source.is_dir():
        raise ValueError(f"{source}: expected a submission folder")
    if not valid_name(name):
        raise ValueError(f"submission name {name!r}: expected {NAME_RULE}")
    target = Path(config.worker.submissions_dir) / name
    if target.exists():
        raise ValueError(f"a submission called {name!r} already exists in {target.parent}")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Copy under a hidden name first: the dispatcher skips hidden folders, so it never
    # picks up a half-copied submission.
    staging = target.with_name(f".{name}.incoming")
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("training_output"))
    staging.rename(target)
    with Ledger(config.ledger_path) as ledger:
        ledger.add([name])
    return name
