"""The ledger: an SQLite store of the event's submissions and every change of their state.

Each transition is one transaction that checks the state it starts from, so a submission
can neither be claimed twice nor scored twice, and a crash leaves either the old state or
the new one. The ``transitions`` table keeps the history (who scored what, when).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from runner.errors import LedgerError
from runner.fair_queue import Waiting, fair_order, team_of
from runner.states import RUNNING_STATES, Move, SubmissionState, TransitionError, check_move
from runner.untrusted import visible

_STATE_NAMES = ", ".join(f"'{state}'" for state in SubmissionState)
_RUNNING_PLACEHOLDERS = ", ".join("?" for _ in RUNNING_STATES)
# The cloud instance of a submission's runs (runner.aws.cost): in a new ledger's table, and
# added to a ledger of an earlier version.
_INSTANCE_COLUMNS = (("instance_id", "TEXT"), ("instance_type", "TEXT"), ("market", "TEXT"),
                     ("launched_at", "REAL"), ("terminated_at", "REAL"),
                     ("instance_seconds", "REAL"), ("cost_usd", "REAL"))
_INSTANCE_COLUMN_LINES = "\n".join(f"    {column} {kind}," for column, kind in _INSTANCE_COLUMNS)
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS submissions (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ({_STATE_NAMES})),
    attempts INTEGER NOT NULL DEFAULT 0,
    error_msg TEXT NOT NULL DEFAULT '',
    scores TEXT,
    train_time REAL,
    valid_time REAL,
    test_time REAL,
    run_time REAL,
    peak_memory_mb REAL,
    worker TEXT NOT NULL DEFAULT '',
    sandboxed INTEGER NOT NULL DEFAULT 0,
    team TEXT NOT NULL DEFAULT '',
    claimed_before INTEGER NOT NULL DEFAULT 0,
{_INSTANCE_COLUMN_LINES}
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS submissions_by_state ON submissions (state, created_at, name);
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL REFERENCES submissions(name),
    from_state TEXT,
    to_state TEXT NOT NULL,
    at REAL NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS teams (
    team TEXT PRIMARY KEY,
    last_turn INTEGER NOT NULL DEFAULT 0,
    head TEXT,
    head_again INTEGER NOT NULL DEFAULT 0,
    head_created_at REAL
);
"""
# After the columns an earlier ledger lacks are added (_add_missing_columns).
FAIR_QUEUE_SCHEMA = """
CREATE INDEX IF NOT EXISTS submissions_by_team
    ON submissions (team, state, claimed_before DESC, created_at, name);
CREATE INDEX IF NOT EXISTS teams_in_turn
    ON teams (head_again DESC, last_turn, head_created_at, head) WHERE head IS NOT NULL;
CREATE INDEX IF NOT EXISTS teams_by_turn ON teams (last_turn);
"""


class Transition(NamedTuple):
    """One recorded change of state."""

    name: str
    from_state: str | None
    to_state: str
    detail: str
    at: float


@dataclass(frozen=True)
class Submission:
    """One row of the ledger."""

    name: str
    state: SubmissionState
    attempts: int
    error_msg: str
    scores: dict[str, dict[str, float]] | None
    train_time: float | None
    valid_time: float | None
    test_time: float | None
    run_time: float | None
    peak_memory_mb: float | None
    worker: str
    created_at: float
    updated_at: float
    sandboxed: bool = False
    team: str = ""
    # The cloud instance of the last run (runner.aws.cost); seconds and cost add up every
    # run's, retries included.
    instance_id: str | None = None
    instance_type: str | None = None
    market: str | None = None
    launched_at: float | None = None
    terminated_at: float | None = None
    instance_seconds: float | None = None
    cost_usd: float | None = None


class Ledger:
    """The submissions of one event, in an SQLite file (WAL mode), safe across threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise LedgerError(self.path, f"cannot create its folder ({error.strerror})") from None
        # One connection shared by the dispatcher's threads, serialised by a lock; each
        # transition is short, so the lock is never held for long.
        self._lock = threading.Lock()
        with self._errors_named():
            self._connection = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30
            )
            self._connection.row_factory = sqlite3.Row
            # No memory map of the database file: a file truncated or a disk filled under a
            # mapping ends the process with SIGBUS instead of an error SQLite can report.
            self._connection.execute("PRAGMA mmap_size=0")
            self._connection.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a commit survives any crash of the process (a SIGKILLed
            # dispatcher) without an fsync each; only a power loss can roll back the last
            # commits, which at worst runs a submission again, never scores one twice.
            # FULL cost 2-6 ms of fsync per submission here, NORMAL 0.4-0.7 ms.
            self._connection.execute("PRAGMA synchronous=NORMAL")
            self._connection.executescript(SCHEMA)
            _add_missing_columns(self._connection)
            self._connection.executescript(FAIR_QUEUE_SCHEMA)
        # The file opened, by identity: a ledger deleted or replaced while in use would take
        # every later transition into a file nobody will read again.
        self.identity = _identity(self.path)

    def close(self) -> None:
        """Close the connection."""
        self._connection.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _errors_named(self) -> Iterator[None]:
        """Turn SQLite's and the file system's errors into one LedgerError naming the file."""
        try:
            yield
        except sqlite3.DatabaseError as error:
            problem = str(error)
            if "not a database" in problem:
                problem = "not an SQLite database (is ledger the right file?)"
            elif "readonly" in problem or "unable to open" in problem:
                problem = f"cannot write the ledger ({problem}: read-only or immutable file?)"
            raise LedgerError(self.path, problem) from None
        except OSError as error:
            raise LedgerError(self.path, error.strerror or str(error)) from None

    def check_identity(self) -> None:
        """Raise LedgerError when the ledger file was deleted or replaced since it was opened."""
        try:
            now = _identity(self.path)
        except FileNotFoundError:
            raise LedgerError(self.path, "the ledger was deleted while in use") from None
        if now != self.identity:
            raise LedgerError(self.path, "the ledger was replaced by another file while in use")

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._errors_named():
            self.check_identity()
            yield self._connection

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._errors_named():
            self.check_identity()
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield self._connection
                self._connection.execute("COMMIT")
            except BaseException:
                if self._connection.in_transaction:  # a failed COMMIT leaves it open
                    with suppress(sqlite3.Error):
                        self._connection.execute("ROLLBACK")
                raise

    # -- reading ------------------------------------------------------------------------

    def get(self, name: str) -> Submission:
        """Return the submission called ``name`` (KeyError when unknown)."""
        with self._reading() as db:
            row = db.execute(
                "SELECT * FROM submissions WHERE name = ?", (name,)
            ).fetchone()
        if row is None:
            raise KeyError(f"no submission {name!r} in {self.path}")
        return _submission(row)

    def all(self) -> list[Submission]:
        """Return every submission, oldest first."""
        with self._reading() as db:
            rows = db.execute(
                "SELECT * FROM submissions ORDER BY created_at, name"
            ).fetchall()
        return [_submission(row) for row in rows]

    def names(self) -> set[str]:
        """Return the names of all submissions."""
        with self._reading() as db:
            return {row[0] for row in db.execute("SELECT name FROM submissions")}

    def still_claimed(self, name: str, worker: str) -> bool:
        """Whether ``name`` still runs under ``worker`` (nobody re-queued or stopped it)."""
        with self._reading() as db:
            row = db.execute(
                "SELECT state, worker FROM submissions WHERE name = ?", (name,)).fetchone()
        return row is not None and row[0] in RUNNING_STATES and row[1] == worker

    def count_new(self) -> int:
        """Return how many submissions wait to be run."""
        with self._reading() as db:
            return db.execute(
                "SELECT COUNT(*) FROM submissions WHERE state = ?", (SubmissionState.NEW,)
            ).fetchone()[0]

    def transitions(self, name: str | None = None) -> list[Transition]:
        """Return every change of state (of one submission, or all), in order."""
        query = "SELECT name, from_state, to_state, detail, at FROM transitions"
        arguments: tuple[Any, ...] = ()
        if name is not None:
            query, arguments = query + " WHERE name = ?", (name,)
        with self._reading() as db:
            rows = db.execute(query + " ORDER BY id", arguments).fetchall()
        return [Transition(*row) for row in rows]

    # -- transitions --------------------------------------------------------------------

    def add(self, names: Iterable[str]) -> list[str]:
        """Record the given submissions as ``new``; return those that were not known yet."""
        added = []
        with self._transaction() as db:
            for name in names:
                now = time.time()
                cursor = db.execute(
                    "INSERT OR IGNORE INTO submissions (name, state, team, created_at,"
                    " updated_at) VALUES (?, ?, ?, ?, ?)",
                    (name, SubmissionState.NEW, team_of(name), now, now),
                )
                if cursor.rowcount:
                    _log(db, name, None, SubmissionState.NEW, now, "discovered")
                    _rehead(db, team_of(name))
                    added.append(name)
        return added

    def claim(self, limit: int, worker: str, max_running_per_team: int | None = None
              ) -> list[str]:
        """Move up to ``limit`` new submissions to ``sent_to_training``, in fair order
        (``runner.fair_queue``): round-robin across teams, oldest first within a team,
        those claimed before first; a team with ``max_running_per_team`` runs going
        waits."""
        if limit <= 0:
            return []
        with self._transaction() as db:
            turn = db.execute("SELECT COALESCE(MAX(last_turn), 0) FROM teams").fetchone()[0]
            running: dict[str, int] = {}
            full: list[str] = []  # teams at max_running_per_team
            if max_running_per_team is not None:
                running = dict(db.execute(
                    "SELECT team, COUNT(*) FROM submissions"
                    f" WHERE state IN ({_RUNNING_PLACEHOLDERS}) GROUP BY team",
                    RUNNING_STATES).fetchall())
                full = [team for team, count in running.items()
                        if count >= max_running_per_team]
            names = []
            while len(names) < limit:
                # Each team's head is kept in ``teams``: a turn costs an index probe,
                # whatever the length of the queue.
                excluded = ", ".join("?" for _ in full)
                row = db.execute(
                    "SELECT team, head FROM teams WHERE head IS NOT NULL"
                    + (f" AND team NOT IN ({excluded})" if full else "")
                    + " ORDER BY head_again DESC, last_turn, head_created_at, head LIMIT 1",
                    full).fetchone()
                if row is None:
                    break
                team, name = row
                _move(db, name, Move.CLAIM, worker=worker, claimed_before=1)
                turn += 1
                db.execute("UPDATE teams SET last_turn = ? WHERE team = ?", (turn, team))
                names.append(name)
                running[team] = running.get(team, 0) + 1
                if max_running_per_team is not None and running[team] >= max_running_per_team:
                    full.append(team)
        return names

    def queue_positions(self) -> dict[str, int]:
        """Each waiting submission's place in the fair order (1 starts next), if nothing
        else arrives and no team is held back by ``max_running_per_team``."""
        with self._reading() as db:
            waiting = [Waiting(name, team, bool(again)) for name, team, again in db.execute(
                "SELECT name, team, claimed_before FROM submissions WHERE state = ?"
                " ORDER BY created_at, name", (SubmissionState.NEW,))]
            turns = dict(db.execute("SELECT team, last_turn FROM teams WHERE last_turn > 0"))
        return {item.key: position
                for position, item in enumerate(fair_order(waiting, turns), start=1)}

    def mark_training(self, name: str, sandboxed: bool = False) -> None:
        """The worker is set up and the run starts, ``sandboxed`` or not."""
        with self._transaction() as db:
            _move(db, name, Move.START, sandboxed=int(sandboxed),
                  detail="sandboxed" if sandboxed else "not sandboxed")

    def mark_tested(self, name: str, run_time: float | None, peak_memory_mb: float | None) -> None:
        """The run succeeded and its output was collected."""
        with self._transaction() as db:
            _tested(db, name, run_time, peak_memory_mb)

    def mark_scored(self, name: str, scores: dict[str, dict[str, float]],
                    times: dict[str, float]) -> None:
        """The collected output was read into scores and times."""
        with self._transaction() as db:
            _scored(db, name, scores, times)

    def mark_tested_and_scored(self, name: str, run_time: float | None,
                               peak_memory_mb: float | None,
                               scores: dict[str, dict[str, float]],
                               times: dict[str, float]) -> None:
        """``mark_tested`` then ``mark_scored`` in one transaction: both transitions are
        in the history, for one commit."""
        with self._transaction() as db:
            _tested(db, name, run_time, peak_memory_mb)
            _scored(db, name, scores, times)

    def mark_training_error(self, name: str, error_msg: str, run_time: float | None,
                            peak_memory_mb: float | None) -> None:
        """The submission failed, ran past its timeout or left unusable results."""
        with self._transaction() as db:
            _move(db, name, Move.FAIL, error_msg=error_msg, run_time=run_time,
                  peak_memory_mb=peak_memory_mb)

    def mark_checking_error(self, name: str, error_msg: str) -> None:
        """The system could not run the submission; it will not be retried by itself."""
        with self._transaction() as db:
            _move(db, name, Move.GIVE_UP, error_msg=error_msg)

    def retry(self, name: str, reason: str, max_attempts: int) -> SubmissionState:
        """Count a lost attempt: back to ``new``, or ``checking_error`` once exhausted.

        Returns the new state.
        """
        with self._transaction() as db:
            attempts = db.execute(
                "SELECT attempts FROM submissions WHERE name = ?", (name,)
            ).fetchone()[0] + 1
            if attempts >= max_attempts:
                message = f"gave up after {attempts} attempts; last: {reason}"
                return _move(db, name, Move.GIVE_UP, attempts=attempts, error_msg=message)
            return _move(db, name, Move.REQUEUE, attempts=attempts, error_msg=reason,
                         detail=reason)

    def release(self, name: str, reason: str) -> None:
        """Give a claimed submission back without counting an attempt (shutdown)."""
        with self._transaction() as db:
            _move(db, name, Move.REQUEUE, detail=reason)

    def recover_abandoned(self, max_attempts: int | None = None) -> list[str]:
        """Put back to ``new`` what a dead dispatcher left running; return their names.

        A run that had started unsandboxed counts as an attempt, since the submission may
        have killed its dispatcher: with ``max_attempts``, one whose attempts reach it is
        ``checking_error``. A sandboxed run cannot reach the dispatcher, and one still in
        ``sent_to_training`` had not started: those go back at no cost, so that restarts
        (a deploy, the OOM killer, a reboot) never cost the queue's first teams their run.
        """
        with self._transaction() as db:
            rows = db.execute(
                "SELECT name, state, attempts, sandboxed FROM submissions"
                f" WHERE state IN ({_RUNNING_PLACEHOLDERS})", RUNNING_STATES).fetchall()
            for name, state, attempts, sandboxed in rows:
                if sandboxed or state == SubmissionState.SENT_TO_TRAINING:
                    why = "sandboxed" if sandboxed else "not started yet"
                    _move(db, name, Move.REQUEUE,
                          detail=f"left running by a dead dispatcher ({why}: no attempt)")
                    continue
                attempts += 1
                if max_attempts is not None and attempts >= max_attempts:
                    message = (f"the dispatcher died {attempts} times while running this "
                               "submission")
                    _move(db, name, Move.GIVE_UP, attempts=attempts, error_msg=message,
                          detail=message)
                else:
                    _move(db, name, Move.REQUEUE, attempts=attempts,
                          detail="left running by a dead dispatcher")
        return [row[0] for row in rows]

    def record_instance(self, name: str, *, instance_id: str, instance_type: str, market: str,
                        launched_at: float, terminated_at: float, seconds: float,
                        cost_usd: float | None) -> None:
        """Keep the instance a run of ``name`` used, adding its seconds and cost to the
        submission's (whatever its state: the money is spent either way)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE submissions SET instance_id = ?, instance_type = ?, market = ?, "
                "launched_at = ?, terminated_at = ?, "
                "instance_seconds = COALESCE(instance_seconds, 0) + ?, "
                "cost_usd = CASE WHEN ? IS NULL THEN cost_usd "
                "ELSE COALESCE(cost_usd, 0) + ? END WHERE name = ?",
                (instance_id, instance_type, market, launched_at, terminated_at, seconds,
                 cost_usd, cost_usd, name))

    def rerun(self, name: str) -> None:
        """Queue a finished submission again, forgetting its results and attempts."""
        with self._transaction() as db:
            _move(db, name, Move.RERUN, attempts=0, error_msg="", scores=None,
                  train_time=None, valid_time=None, test_time=None, run_time=None,
                  peak_memory_mb=None, detail="rerun asked")


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Bring a ledger written by an earlier version up to the schema's columns."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(submissions)")}
    if "sandboxed" not in columns:
        db.execute("ALTER TABLE submissions ADD COLUMN sandboxed INTEGER NOT NULL DEFAULT 0")
    for column, kind in _INSTANCE_COLUMNS:
        if column not in columns:
            db.execute(f"ALTER TABLE submissions ADD COLUMN {column} {kind}")
    if "team" not in columns:
        # Before team folders every submission was its own team, queued oldest first: with
        # no turn taken yet, the fair order starts as that same order.
        db.execute("BEGIN IMMEDIATE")
        try:
            columns = {row[1] for row in db.execute("PRAGMA table_info(submissions)")}
            if "team" in columns:  # another process brought it up to date meanwhile
                db.execute("COMMIT")
                return
            db.execute("ALTER TABLE submissions ADD COLUMN team TEXT NOT NULL DEFAULT ''")
            db.execute("ALTER TABLE submissions ADD COLUMN claimed_before INTEGER NOT NULL"
                       " DEFAULT 0")
            db.execute("UPDATE submissions SET team = name,"
                       " claimed_before = (state != ? OR attempts > 0)", (SubmissionState.NEW,))
            for (name,) in db.execute("SELECT name FROM submissions WHERE state = ?",
                                      (SubmissionState.NEW,)).fetchall():
                _rehead(db, name)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def _identity(path: Path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def _tested(db: sqlite3.Connection, name: str, run_time: float | None,
            peak_memory_mb: float | None) -> None:
    _move(db, name, Move.TEST, run_time=run_time, peak_memory_mb=peak_memory_mb)


def _scored(db: sqlite3.Connection, name: str, scores: dict[str, dict[str, float]],
            times: dict[str, float]) -> None:
    _move(db, name, Move.SCORE, scores=json.dumps(scores), error_msg="",
          **{f"{step}_time": value for step, value in times.items()})


def _move(db: sqlite3.Connection, name: str, move: Move, detail: str = "",
          **columns: Any) -> SubmissionState:
    """Make ``move`` with ``columns`` and log it; return the state it ended in."""
    now = time.time()
    # What a run said is stored as it will be shown: its control characters as escapes.
    detail = visible(detail)
    if "error_msg" in columns:
        columns["error_msg"] = visible(columns["error_msg"])
    columns.update(state=move.target, updated_at=now)
    assignments = ", ".join(f"{column} = ?" for column in columns)
    if len(move.sources) == 1:
        # The usual case, one statement: the state it starts from is the one it must be in.
        moved = db.execute(f"UPDATE submissions SET {assignments} WHERE name = ? AND state = ?",
                           (*columns.values(), name, move.sources[0])).rowcount
        if moved:
            _log(db, name, move.sources[0], move.target, now, detail)
            if SubmissionState.NEW in (move.target, *move.sources):
                _rehead(db, team_of(name))
            return move.target
    row = db.execute("SELECT state FROM submissions WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise TransitionError(f"no submission {name!r}")
    check_move(name, row[0], move)
    db.execute(f"UPDATE submissions SET {assignments} WHERE name = ?", (*columns.values(), name))
    _log(db, name, row[0], move.target, now, detail)
    if SubmissionState.NEW in (move.target, *move.sources):
        _rehead(db, team_of(name))
    return move.target


def _rehead(db: sqlite3.Connection, team: str) -> None:
    """Keep ``teams`` naming the submission ``team`` starts next (its oldest waiting, one
    claimed before first), after one of its submissions joined or left the queue."""
    head = db.execute(
        "SELECT name, claimed_before, created_at FROM submissions WHERE team = ? AND state = ?"
        " ORDER BY claimed_before DESC, created_at, name LIMIT 1",
        (team, SubmissionState.NEW)).fetchone() or (None, 0, None)
    db.execute("INSERT INTO teams (team, head, head_again, head_created_at) VALUES (?, ?, ?, ?)"
               " ON CONFLICT (team) DO UPDATE SET head = excluded.head,"
               " head_again = excluded.head_again, head_created_at = excluded.head_created_at",
               (team, *head))


def _log(db: sqlite3.Connection, name: str, source: str | None, target: str, at: float,
         detail: str) -> None:
    db.execute(
        "INSERT INTO transitions (name, from_state, to_state, at, detail) VALUES (?, ?, ?, ?, ?)",
        (name, source, target, at, detail),
    )


def _submission(row: sqlite3.Row) -> Submission:
    values = dict(row)
    values["state"] = SubmissionState(values["state"])
    values["scores"] = json.loads(values["scores"]) if values["scores"] else None
    values["sandboxed"] = bool(values["sandboxed"])
    del values["claimed_before"]
    return Submission(**values)
