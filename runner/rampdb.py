"""RAMP-board source: the dispatcher's submissions from a ramp-database (ramp-frontend's).

It honours ramp-engine 0.10.1's contract with the board (``ramp_engine/dispatcher.py``):
the event's new submissions, never the sandbox; states through ``set_submission_state``;
results through ``set_time``/``set_scores``/``set_bagged_scores`` read from
``predictions_dir/<submission>`` and the peak memory through ``set_submission_max_ram``;
``queue_position`` 1..n while waiting and -1 once training; leaderboards refreshed as
ramp-engine refreshes them. Unlike ramp-engine (oldest first), new submissions start in
fair order (``runner.fair_queue``): round-robin across the event's teams, a team's last
turn being its latest ``sent_to_training_timestamp``; one sent to training before (an
organiser's re-run, or a run lost) goes first; ``queue_position`` follows that order.

A submission is named by its folder, ``submission_<id:09d>`` (``Submission.basename``): the
name ramp-engine hands its workers, unique where participants' names are not.

Every method is one short transaction. ramp-database's setters commit as they go; their
session is joined to our connection's transaction (``join_transaction_mode=
"rollback_only"``), so their commits only flush and a transition lands whole or not at
all. A dropped connection or a restarting PostgreSQL costs a retry (``pool_pre_ping``),
not a crashed dispatcher.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from ramp_database.model import Event, EventTeam, Submission
from ramp_database.tools.leaderboard import update_all_user_leaderboards, update_leaderboards
from ramp_database.tools.submission import (
    set_bagged_scores,
    set_scores,
    set_submission_error_msg,
    set_submission_max_ram,
    set_submission_state,
    set_time,
)
from sqlalchemy import create_engine, event, func, select
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from runner import ramptest
from runner.config import EventConfig
from runner.errors import EventError, SubmissionError
from runner.eventlock import event_lock
from runner.fair_queue import Waiting, fair_order
from runner.states import (
    QUEUED_STATES,
    RUNNING_STATES,
    Move,
    SubmissionState,
    TransitionError,
    check_move,
)
from runner.training_output import RunResults
from runner.untrusted import visible

logger = logging.getLogger("runner.rampdb")

# How long the board may stay unreachable before a call gives up, and the longest pause
# between two tries: a PostgreSQL restart takes seconds, a failover a minute or two.
OUTAGE_SECONDS = 600.0
MAX_RETRY_PAUSE = 5.0
# What PostgreSQL (psycopg2) and SQLite say when the server is away or the file is busy.
OUTAGE_WORDS = ("connection", "connect to server", "server closed", "terminating",
                "shutting down", "starting up", "database is locked", "timeout")
# ramp-engine's words for a submission the system could not run (dispatcher.py).
CHECKING_ERROR_MESSAGE = (
    "There was a problem with sending your submission for training. This problem is on "
    "RAMP side and most likely it is not related to your code. If this happened for the "
    "first time to this submission you might consider submitting the same code once "
    "again. Else, please contact the event organizers."
)
NO_TRACEBACK_MESSAGE = (
    "The submission failed without a Python traceback; the organizers have its log."
)

T = TypeVar("T")


def submission_name(submission_id: int) -> str:
    """The folder name of a submission, as ``Submission.basename`` builds it."""
    return f"submission_{submission_id:09d}"


def submission_id(name: str) -> int:
    """The database id behind a ``submission_<id:09d>`` name."""
    prefix, _, number = name.rpartition("_")
    if prefix != "submission" or not number.isdigit():
        raise KeyError(f"{name!r} is not a RAMP submission folder name (submission_<id>)")
    return int(number)


def board_engine(database: Mapping[str, Any]) -> Engine:
    """An engine on the board of a ``sqlalchemy:`` section, as ramp-utils reads it.

    Connections are checked before use (``pool_pre_ping``); SQLite transactions start with
    ``BEGIN IMMEDIATE``, so a transition's read and write see the same state.
    """
    values = {k: v for k, v in database.items() if v is not None}
    if values.get("drivername") == "postgresql":
        # ramp-database installs psycopg2; SQLAlchemy 2.1 would pick psycopg 3 instead.
        values["drivername"] = "postgresql+psycopg2"
    engine = create_engine(URL.create(**values), pool_pre_ping=True)
    if engine.dialect.driver == "psycopg2":
        _adapt_numpy_for_psycopg2()
    if engine.dialect.name == "sqlite":
        # pysqlite delays BEGIN to the first write; take the write lock at the start
        # instead (SQLAlchemy's documented recipe for SQLite transactions).
        @event.listens_for(engine, "connect")
        def _no_implicit_begin(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin_immediate(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
    return engine


def _adapt_numpy_for_psycopg2() -> None:
    """ramp-database's ``set_scores`` hands psycopg2 numpy scalars, which it writes as
    their repr: ``np.float64(0.9)`` since numpy 2, a syntax error on PostgreSQL. Write
    them as the Python numbers they hold."""
    import numpy as np
    from psycopg2.extensions import adapt, register_adapter

    for numpy_type in (np.float64, np.float32, np.int64, np.int32, np.bool_):
        register_adapter(numpy_type, lambda value: adapt(value.item()))


def public_error(error_msg: str, log_file: Path) -> str:
    """What the participant reads of a failed run, never lines of the log (they hold the
    private test score): a built-in worker's message as it is (``runner.results`` keeps
    only the run's error and ramp-runner's line on how it ended); of another (a custom
    worker's, which may quote the log), the traceback that ends it, or a one-line verdict
    that is not a line of the log."""
    if ramptest.is_ended(error_msg):
        return error_msg
    traceback = ramptest.traceback_of(error_msg)
    if traceback:
        return traceback
    message = error_msg.strip()
    try:
        log = log_file.read_text(errors="replace")
    except OSError:
        log = ""
    if not message or "\n" in message or message in log:
        return NO_TRACEBACK_MESSAGE
    return message


class RampSource:
    """The submissions of one event of a RAMP board (see the module docstring)."""

    def __init__(self, config: EventConfig, database: Mapping[str, Any]):
        self.config = config
        self.event_name = config.ramp.event_name
        self.engine = board_engine(database)
        self._lock = threading.Lock()
        # What this dispatcher claimed and still runs: a submission someone else set back
        # to ``new`` is not claimed again before its old run is stopped.
        self._held: set[int] = set()
        # Lost attempts per submission (the board has no column for them).
        self._attempts: dict[int, int] = {}
        self._waiting: tuple[int, ...] | None = None

    # -- connection ---------------------------------------------------------------------

    @contextmanager
    def opened(self) -> Iterator[None]:
        """Hold the event (one dispatcher per event folder) and the board's engine."""
        with event_lock(self.config.ledger_path):
            try:
                self._transaction(self._check_event)
                yield
            finally:
                self.engine.dispose()

    def _transaction(self, work: Callable[[Session, bool], T]) -> T:
        """Run ``work(session, retried)`` in one transaction, again while the board is
        unreachable (up to ``OUTAGE_SECONDS``). ``retried`` says an earlier try may have
        committed before its connection dropped."""
        deadline = time.monotonic() + OUTAGE_SECONDS
        pause, retried = 0.5, False
        while True:
            try:
                with self._lock, self.engine.connect() as connection, connection.begin():
                    session = Session(bind=connection, join_transaction_mode="rollback_only",
                                      expire_on_commit=False, autoflush=False)
                    try:
                        return work(session, retried)
                    finally:
                        session.close()
            except DBAPIError as error:
                if not _is_outage(error) or time.monotonic() > deadline:
                    raise
                logger.warning("board unreachable (%s): trying again in %.1f s",
                               str(error.orig).strip().splitlines()[0], pause)
                time.sleep(pause)
                pause, retried = min(2 * pause, MAX_RETRY_PAUSE), True

    def _check_event(self, session: Session, retried: bool) -> None:
        if session.scalar(select(Event.id).where(Event.name == self.event_name)) is None:
            raise EventError(f"{self.config.path}: ramp.event_name: expected an event of the "
                             f"board, got {self.event_name!r}")

    # -- reading ------------------------------------------------------------------------

    def intake(self) -> None:
        """Notice submissions added or re-queued on the board; renumber the queue then."""
        def work(session: Session, retried: bool) -> None:
            waiting = self._waiting_ids(session)
            if waiting != self._waiting:
                self._renumber(session, waiting)
        self._transaction(work)

    def watch(self, wake: Callable[[], None]) -> None:
        """Nothing to watch: the board announces no arrival, so the dispatcher takes them in
        at each of its wake-ups."""
        return None

    def count_new(self) -> int:
        """How many non-sandbox submissions wait (as of the last intake or claim)."""
        return sum(1 for i in self._waiting or () if i not in self._held)

    def still_claimed(self, name: str, worker: str) -> bool:
        """Whether ``name`` still runs here: nobody set its state meanwhile."""
        key = submission_id(name)
        state = self._transaction(lambda session, retried: session.scalar(
            select(Submission.state).where(Submission.id == key)))
        if key in self._held and state in RUNNING_STATES:
            return True
        self._held.discard(key)
        return False

    # -- transitions --------------------------------------------------------------------

    def claim(self, limit: int, worker: str) -> list[str]:
        """Move up to ``limit`` new submissions to ``sent_to_training``, in fair order
        (``runner.fair_queue``), at most ``dispatcher.max_running_per_team`` of a team
        running."""
        if limit <= 0 or not self.count_new():
            return []
        cap = self.config.dispatcher.max_running_per_team

        def work(session: Session, retried: bool) -> list[int]:
            _, waiting, last_turns = self._queue(session)
            running = {} if cap is None else self._running_per_team(session)
            chosen = [item.key for item in fair_order(
                [item for item in waiting if item.key not in self._held], last_turns,
                running, cap, limit)]
            for key in chosen:
                set_submission_state(session, key, Move.CLAIM.target)
            if chosen:
                self._renumber(session, self._waiting_ids(session))
            return chosen

        claimed = self._transaction(work)
        self._held.update(claimed)
        return [submission_name(key) for key in claimed]

    def mark_training(self, name: str, sandboxed: bool = False) -> None:
        """The worker is set up and the run starts: out of the queue. (A dead dispatcher
        costs a RAMP board's runs no attempt, ``sandboxed`` or not: see recover_abandoned.)"""
        def work(session: Session, retried: bool) -> None:
            submission = self._moving(session, name, Move.START, retried)
            if submission is None:
                return
            set_submission_state(session, submission.id, Move.START.target)
            submission.queue_position = -1
            self._renumber(session, self._waiting_ids(session))
        self._transaction(work)

    def mark_tested(self, name: str, run_time: float | None,
                    peak_memory_mb: float | None) -> None:
        """The run succeeded and its output was collected; its peak memory is kept."""
        def work(session: Session, retried: bool) -> None:
            submission = self._moving(session, name, Move.TEST, retried)
            if submission is None:
                return
            set_submission_state(session, submission.id, Move.TEST.target)
            if peak_memory_mb is not None:
                set_submission_max_ram(session, submission.id, peak_memory_mb)
        self._transaction(work)

    def record_scores(self, name: str, results: RunResults, output_dir: Path) -> None:
        """Store fold times, fold scores and bagged scores as ramp-database reads them from
        ``output_dir``; the submission is scored; the leaderboards are refreshed."""
        def work(session: Session, retried: bool) -> None:
            submission = self._moving(session, name, Move.SCORE, retried)
            if submission is None:
                return
            try:
                set_time(session, submission.id, str(output_dir))
                set_scores(session, submission.id, str(output_dir))
                set_bagged_scores(session, submission.id, str(output_dir))
            except (OSError, ValueError, KeyError, IndexError) as error:
                # Written where the participant's code ran: its fault, not a retry.
                raise SubmissionError(f"unusable results: {type(error).__name__}: "
                                      f"{error}") from None
            set_submission_state(session, submission.id, Move.SCORE.target)
        self._transaction(work)
        self._finished(name)

    def record_run(self, name: str, run_time: float | None, peak_memory_mb: float | None,
                   results: RunResults, output_dir: Path) -> None:
        """``mark_tested``, then ``record_scores``: two transactions, since ramp-database's
        setters commit on their own."""
        self.mark_tested(name, run_time, peak_memory_mb)
        self.record_scores(name, results, output_dir)

    def mark_training_error(self, name: str, error_msg: str, run_time: float | None,
                            peak_memory_mb: float | None) -> None:
        """The submission failed or timed out; the participant reads its traceback."""
        message = visible(public_error(error_msg,
                                       Path(self.config.worker.logs_dir) / name / "log"))

        def work(session: Session, retried: bool) -> None:
            submission = self._moving(session, name, Move.FAIL, retried)
            if submission is None:
                return
            set_submission_state(session, submission.id, Move.FAIL.target)
            set_submission_error_msg(session, submission.id, message)
            if peak_memory_mb is not None:
                set_submission_max_ram(session, submission.id, peak_memory_mb)
        self._transaction(work)
        self._finished(name)

    def mark_checking_error(self, name: str, error_msg: str) -> None:
        """The system could not run it: ramp-engine's message to the participant; the
        reason stays in the dispatcher's log."""
        logger.error("%s: checking_error: %s", name, error_msg)
        self._give_up(name)

    def retry(self, name: str, reason: str, max_attempts: int) -> str:
        """Count a lost attempt: back to ``new``, or ``checking_error`` once exhausted."""
        key = submission_id(name)
        self._attempts[key] = self._attempts.get(key, 0) + 1
        if self._attempts[key] >= max_attempts:
            logger.error("%s: gave up after %d attempts; last: %s", name, self._attempts[key],
                         reason)
            return self._give_up(name)
        return self._requeue(name)

    def release(self, name: str, reason: str) -> None:
        """Give a claimed submission back without counting an attempt (shutdown)."""
        self._requeue(name)

    def recover_abandoned(self) -> list[str]:
        """Put back to ``new`` what a dead dispatcher left running (ramp-engine resets
        ``sent_to_training`` and ``training``; a ``tested`` one never got its scores)."""
        def work(session: Session, retried: bool) -> list[int]:
            keys = list(session.scalars(self._event_submissions().where(
                Submission.state.in_(Move.REQUEUE.sources))))
            for key in keys:
                set_submission_state(session, key, Move.REQUEUE.target)
            if keys:
                self._renumber(session, self._waiting_ids(session))
            return keys
        return [submission_name(key) for key in self._transaction(work)]

    # -- helpers ------------------------------------------------------------------------

    def _event_submissions(self) -> Any:
        return (select(Submission.id).join(EventTeam, Submission.event_team_id == EventTeam.id)
                .join(Event, EventTeam.event_id == Event.id)
                .where(Event.name == self.event_name))

    def _queue(self, session: Session) -> tuple[list[int], list[Waiting], dict[int, Any]]:
        """The event's non-sandbox submissions sent to training, and those new by team,
        oldest first, with each team's last turn (its latest ``sent_to_training_timestamp``):
        one query."""
        earlier = Submission.__table__.alias("earlier")
        last_turn = (select(func.max(earlier.c.sent_to_training_timestamp))
                     .where(earlier.c.event_team_id == Submission.event_team_id)
                     .scalar_subquery())
        rows = session.execute(
            select(Submission.id, Submission.state, Submission.name, Event.ramp_sandbox_name,
                   Submission.event_team_id, Submission.sent_to_training_timestamp,
                   last_turn.label("last_turn"))
            .join(EventTeam, Submission.event_team_id == EventTeam.id)
            .join(Event, EventTeam.event_id == Event.id)
            .where(Event.name == self.event_name, Submission.state.in_(QUEUED_STATES))
            .order_by(Submission.submission_timestamp, Submission.id))
        sent, waiting, last_turns = [], [], {}
        for row in rows:
            if row.name == row.ramp_sandbox_name:
                continue
            if row.state == SubmissionState.SENT_TO_TRAINING:
                sent.append(row.id)
                continue
            waiting.append(Waiting(row.id, row.event_team_id,
                                   row.sent_to_training_timestamp is not None))
            if row.last_turn is not None:
                last_turns[row.event_team_id] = row.last_turn
        return sent, waiting, last_turns

    def _running_per_team(self, session: Session) -> dict[int, int]:
        return dict(session.execute(
            select(Submission.event_team_id, func.count())
            .join(EventTeam, Submission.event_team_id == EventTeam.id)
            .join(Event, EventTeam.event_id == Event.id)
            .where(Event.name == self.event_name, Submission.state.in_(RUNNING_STATES))
            .group_by(Submission.event_team_id)).all())

    def _waiting_ids(self, session: Session) -> tuple[int, ...]:
        """Non-sandbox submissions waiting, in queue order: those sent to training first,
        then the new ones in fair order."""
        sent, waiting, last_turns = self._queue(session)
        return (*sent, *(item.key for item in fair_order(waiting, last_turns)))

    def _renumber(self, session: Session, waiting: tuple[int, ...]) -> None:
        """queue_position 1..n as RAMP's frontend shows it, and the new-submission
        leaderboards (ramp-engine refreshes them whenever its queues change)."""
        for position, key in enumerate(waiting, start=1):
            submission = session.get(Submission, key)
            if submission.queue_position != position:
                submission.queue_position = position
        update_all_user_leaderboards(session, self.event_name, new_only=True)
        self._waiting = waiting

    def _moving(self, session: Session, name: str, move: Move,
                retried: bool) -> Submission | None:
        """The submission if ``move`` may start from its state; None if an earlier try
        already made it; TransitionError if someone else changed it."""
        submission = session.get(Submission, submission_id(name))
        if submission is None:
            raise TransitionError(f"no submission {name!r} on the board")
        try:
            check_move(name, submission.state, move)
        except TransitionError:
            if retried and submission.state == move.target:
                return None
            self._held.discard(submission.id)
            raise
        return submission

    def _requeue(self, name: str) -> str:
        return self._end_claim(name, Move.REQUEUE)

    def _give_up(self, name: str) -> str:
        state = self._end_claim(name, Move.GIVE_UP)
        self._finished(name)
        return state

    def _end_claim(self, name: str, move: Move) -> str:
        """Make ``move`` (back to the queue, or given up) on a claimed submission, unless
        someone else changed it meanwhile (then it is left as they set it); return its
        state."""
        key = submission_id(name)
        held = key in self._held
        self._held.discard(key)

        def work(session: Session, retried: bool) -> str:
            submission = session.get(Submission, key)
            if submission is None or not held or submission.state not in move.sources:
                return submission.state if submission is not None else "gone"
            set_submission_state(session, key, move.target)
            if move is Move.GIVE_UP:
                set_submission_error_msg(session, key, CHECKING_ERROR_MESSAGE)
            self._renumber(session, self._waiting_ids(session))
            return move.target
        return self._transaction(work)

    def _finished(self, name: str) -> None:
        """A result landed: the run is over here; refresh the event's leaderboards."""
        key = submission_id(name)
        self._held.discard(key)
        self._attempts.pop(key, None)

        def work(session: Session, retried: bool) -> None:
            update_leaderboards(session, self.event_name)
            update_all_user_leaderboards(session, self.event_name)
        self._transaction(work)


def _is_outage(error: DBAPIError) -> bool:
    """A lost, refused or busy connection, as opposed to a statement the board refuses."""
    if error.connection_invalidated or isinstance(error, InterfaceError):
        return True
    if not isinstance(error, OperationalError):
        return False
    text = str(error.orig).lower()
    return any(word in text for word in OUTAGE_WORDS)
