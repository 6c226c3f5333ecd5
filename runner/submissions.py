"""The event's submission folders: which ones are ready to run, and adding new ones.

Intake rule (what the dispatcher takes from ``submissions_dir``):

- only real folders, named like ``VALID_NAME``, directly inside it or inside a *team
  folder* directly inside it (``submissions/<team>/<submission>``, named ``team/submission``
  in the ledger: ``runner.fair_queue`` takes turns between teams); a symbolic link is
  refused (said once, in the log), whatever it points to; hidden names are staging areas;
- a folder directly inside is a team folder when, complete, it holds folders and no file
  (hidden names and links aside), and stays one; any other (files at its top, or empty)
  is a submission with no team, as before team folders;
- only complete folders: one that arrived by a rename (``submit``, or ``mv`` on the same
  file system: a rename is atomic) at once; one created in place (``cp -r``, ``rsync``,
  an upload) once nothing in it changed for ``QUIET_SECONDS``: its newest change time
  (ctime, which ``cp -a`` cannot set back) is that old, or, whatever the clocks say, its
  entries' count, sizes and ctimes stayed the same that long. A folder still being copied
  is never run, so never blamed on its author.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Iterable
from pathlib import Path

from runner.config import EventConfig, WorkerConfig
from runner.fair_queue import TEAM_SEPARATOR, team_of
from runner.ledger import Ledger

logger = logging.getLogger("runner.submissions")

# A name ramp-test and every filesystem accept, and that cannot climb out of the folder.
VALID_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Names become folder and file names, with prefixes and suffixes (the run's scratch folder,
# its log): far under the 255 bytes a file name may take.
MAX_NAME_LENGTH = 64
NAME_RULE = (f"letters, digits, '_', '-' and '.', at most {MAX_NAME_LENGTH} characters, "
             f"or two such names as team{TEAM_SEPARATOR}submission")


def valid_name(name: str) -> bool:
    """Whether ``name`` may name a submission: ``submission`` or ``team/submission``, each
    part matched whole (a trailing newline is not a name, ``..`` is not one) and bounded."""
    parts = name.split(TEAM_SEPARATOR)
    return len(parts) <= 2 and all(
        len(part) <= MAX_NAME_LENGTH and VALID_NAME.fullmatch(part) is not None
        for part in parts)


# A team's submission runs as if its team folder were the event's: the worker is given the
# team's folders (and its submission's own name), so that no worker ever sees a '/' in a name.
TEAM_FOLDER_KEYS = ("submissions_dir", "predictions_dir", "logs_dir")


def worker_view(config: dict, name: str) -> tuple[dict, str]:
    """``(config, submission)`` to make the worker of ``name`` with: a copy of the worker
    dict, and for ``team/submission`` the team's ``submissions_dir``, ``predictions_dir`` and
    ``logs_dir`` with ``submission``, so that its log is ``logs_dir/team/submission/log``
    and its predictions ``predictions_dir/team/submission``. Every worker (RAMP's contract
    takes a folder name) runs it unchanged."""
    team, separator, own = name.partition(TEAM_SEPARATOR)
    if not separator:
        return copy.copy(config), name
    paths = {key: os.path.join(config[key], team) for key in TEAM_FOLDER_KEYS}
    section = config.unchanged_section() if isinstance(config, WorkerConfig) else None
    if section is None:
        return {**config, **paths}, own
    return WorkerConfig({**config, **paths}, dataclasses.replace(section, **paths)), own


# How long a folder created in place must stay unchanged before it is taken in.
QUIET_SECONDS = 1.0


class Intake:
    """Decides which names in ``submissions_dir`` are submissions ready to run.

    It remembers every name it has judged, so that a wake-up costs one ``stat`` of the
    folder and of each team folder, and a listing (names only) only of a folder that
    changed.
    """

    def __init__(self, submissions_dir: str | Path, known: Iterable[str] = ()):
        self.folder = Path(submissions_dir)
        self.known = set(known)
        # Team folders: team -> modification time of its last listing.
        self.teams: dict[str, int | None] = {
            team_of(name): None for name in self.known if TEAM_SEPARATOR in name}
        self.known.update(self.teams)
        # Created in place and not quiet yet: name -> (signature, monotonic time first seen).
        self.pending: dict[str, tuple[tuple[int, int, int], float]] = {}
        self.moved_in: set[str] = set()
        self._listed_mtime: int | None = None

    def arrived_by_rename(self, name: str) -> None:
        """``name`` (``submission`` or ``team/submission``) was renamed into its folder (a
        watch saw it): complete at once."""
        self.moved_in.add(name)

    def ready(self) -> list[str]:
        """Names that became ready since the last call, oldest judgement first."""
        # Top level first: a folder judged a team folder is listed in the same call.
        top = [*self._listing_changes(), *(n for n in self.pending if TEAM_SEPARATOR not in n)]
        ready = [name for name in dict.fromkeys(top) if self._judge(name)]
        in_teams = [*self._team_changes(), *(n for n in self.pending if TEAM_SEPARATOR in n)]
        ready += [name for name in dict.fromkeys(in_teams) if self._judge(name)]
        self.known.update(ready)
        return ready

    def _listing_changes(self) -> list[str]:
        listed = self._list(self.folder, self._listed_mtime)
        if listed is None:
            return []
        self._listed_mtime, names = listed
        return names

    def _team_changes(self) -> list[str]:
        names = []
        for team, mtime in self.teams.items():
            listed = self._list(self.folder / team, mtime, prefix=team + TEAM_SEPARATOR)
            if listed is not None:
                self.teams[team], found = listed
                names += found
        return names

    def _list(self, folder: Path, listed_mtime: int | None,
              prefix: str = "") -> tuple[int, list[str]] | None:
        """(mtime, names not judged yet) of ``folder``; None when unchanged since
        ``listed_mtime`` or gone."""
        try:
            mtime = os.stat(folder).st_mtime_ns
        except (FileNotFoundError, NotADirectoryError):
            return None
        # A timestamp newer than a second may hide a second change within its tick.
        recent = time.time_ns() - mtime < 1_000_000_000
        if mtime == listed_mtime and not recent:
            return None
        with os.scandir(folder) as entries:
            names = sorted(prefix + e.name for e in entries)
        return mtime, [n for n in names if n not in self.known and n not in self.pending]

    def next_judgement(self) -> float | None:
        """Seconds until a folder not quiet yet may be (None when none waits)."""
        if not self.pending:
            return None
        now_ns, now = time.time_ns(), time.monotonic()
        return max(0.0, min(min((QUIET_SECONDS * 1e9 - (now_ns - signature[2])) / 1e9,
                                QUIET_SECONDS - (now - seen))
                            for signature, seen in self.pending.values()))

    def _judge(self, name: str) -> bool:
        """True when ``name`` is a submission ready to run; refused names are remembered
        and said once; a folder found to be a team folder is remembered as one."""
        if name.rpartition(TEAM_SEPARATOR)[2].startswith("."):
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
            return self._submission_or_team(name, path, arrived_whole=True)
        signature = _signature(path)
        now = time.monotonic()
        seen = self.pending.get(name)
        quiet = (time.time_ns() - signature[2] >= QUIET_SECONDS * 1e9
                 or (seen is not None and seen[0] == signature
                     and now - seen[1] >= QUIET_SECONDS))
        if quiet:
            self.pending.pop(name, None)
            return self._submission_or_team(name, path)
        if seen is None or seen[0] != signature:
            self.pending[name] = (signature, now)
        return False

    def _submission_or_team(self, name: str, path: Path, arrived_whole: bool = False) -> bool:
        """True for a submission; a complete folder at the top holding only folders is a
        team folder instead (remembered, and listed from now on). A team folder renamed
        in brought its submissions whole: they are complete at once too."""
        if TEAM_SEPARATOR in name or not _holds_only_folders(path):
            return True
        self.known.add(name)
        self.teams[name] = None
        if arrived_whole:
            with os.scandir(path) as entries:
                self.moved_in.update(f"{name}{TEAM_SEPARATOR}{e.name}" for e in entries)
        return False

    def _refuse(self, name: str, why: str) -> None:
        self.known.add(name)
        self.pending.pop(name, None)
        logger.warning("submission %s in %s %s", name, self.folder, why)


def _holds_only_folders(path: Path) -> bool:
    """Whether ``path`` holds a real folder and no file, hidden names and links aside (a
    link in a team folder is refused as a submission, as anywhere)."""
    with os.scandir(path) as entries:
        kinds = [("link" if e.is_symlink() else "folder" if e.is_dir(follow_symlinks=False)
                  else "file") for e in entries if not e.name.startswith(".")]
    return "folder" in kinds and "file" not in kinds


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
    """Copy the submission folder ``source`` into the event as ``name`` (``submission``,
    or ``team/submission`` into that team's folder) and queue it."""
    source = Path(source)
    name = name or source.name
    if not source.is_dir():
        raise ValueError(f"{source}: expected a submission folder")
    if not valid_name(name):
        raise ValueError(f"submission name {name!r}: expected {NAME_RULE}")
    submissions = Path(config.worker.submissions_dir)
    target = submissions / name
    if os.path.lexists(target):
        raise ValueError(f"a submission or team folder called {name!r} already exists in "
                         f"{target.parent}")
    team = submissions / team_of(name)
    if TEAM_SEPARATOR in name and not os.path.lexists(team):
        # A new team folder arrives whole, with its first submission in it: the dispatcher
        # never sees it empty (an empty folder is a submission).
        staging = submissions / f".{team.name}.incoming"
        _copy_in(source, staging / target.name)
        staging.rename(team)
    else:
        if TEAM_SEPARATOR in name and (team.is_symlink() or not team.is_dir()
                                       or not _holds_only_folders(team)):
            raise ValueError(f"{team} is not a team folder (a submission, a file or a "
                             f"link): cannot add {name!r}")
        submissions.mkdir(parents=True, exist_ok=True)
        # Copy under a hidden name first: the dispatcher skips hidden folders, so it never
        # picks up a half-copied submission.
        staging = target.with_name(f".{target.name}.incoming")
        _copy_in(source, staging)
        staging.rename(target)
    with Ledger(config.ledger_path) as ledger:
        ledger.add([name])
    return name


def _copy_in(source: Path, staging: Path) -> None:
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("training_output"))
