"""Where a dispatcher's submissions come from and where their states go.

The dispatcher speaks to one ``SubmissionSource``: the standalone ledger fed by the event's
submissions folder (``FolderSource``, here), or a RAMP board's database
(``runner.rampdb``). Every method is one short transaction that checks the state it
starts from, so a submission is never claimed twice nor scored twice.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

from runner.config import EventConfig
from runner.eventlock import event_lock
from runner.ledger import Ledger
from runner.submissions import Intake
from runner.training_output import RunResults

logger = logging.getLogger("runner.source")

SETTLE_MARGIN_SECONDS = 0.02


class SubmissionSource(Protocol):
    """The submission store a dispatcher claims from and records to."""

    def opened(self) -> AbstractContextManager[None]:
        """Hold the event for this dispatcher (DispatcherBusy if another has it) and the
        store's connection, for the dispatcher's whole run."""

    def intake(self) -> None:
        """Take in submissions that arrived since the last call."""

    def watch(self, wake: Callable[[], None]) -> AbstractContextManager[None] | None:
        """While inside, call ``wake()`` soon after new submissions may have arrived; None
        when the source has nothing to watch (the dispatcher then takes them in at each of
        its wake-ups)."""

    def count_new(self) -> int:
        """How many submissions wait to be run."""

    def claim(self, limit: int, worker: str) -> list[str]:
        """Move up to ``limit`` waiting submissions to ``sent_to_training``, in fair order
        (``runner.fair_queue``: round-robin across teams, oldest first within a team,
        those claimed before first, at most ``dispatcher.max_running_per_team`` running)."""

    def still_claimed(self, name: str, worker: str) -> bool:
        """Whether ``name`` is still running under ``worker`` (nobody else changed it)."""

    def mark_training(self, name: str, sandboxed: bool = False) -> None:
        """The worker is set up and the run starts, ``sandboxed`` out of the dispatcher's
        reach or not (a dead dispatcher then costs the run no attempt)."""

    def record_run(self, name: str, run_time: float | None, peak_memory_mb: float | None,
                   results: RunResults, output_dir: Path) -> None:
        """The run succeeded: ``tested``, then ``scored`` with the scores and times read
        from ``output_dir``."""

    def mark_training_error(self, name: str, error_msg: str, run_time: float | None,
                            peak_memory_mb: float | None) -> None:
        """The submission failed or ran past its timeout; ``error_msg`` says how."""

    def mark_checking_error(self, name: str, error_msg: str) -> None:
        """The system could not run the submission; it is not retried by itself."""

    def retry(self, name: str, reason: str, max_attempts: int) -> str:
        """Count a lost attempt: back to ``new``, or ``checking_error`` once exhausted;
        return the new state."""

    def release(self, name: str, reason: str) -> None:
        """Give a claimed submission back without counting an attempt (shutdown)."""

    def recover_abandoned(self) -> list[str]:
        """Put back what a dead dispatcher left running. A run that had started unsandboxed
        counts an attempt (the submission may have killed it): after
        ``dispatcher.max_attempts`` such recoveries it is ``checking_error``, "the
        dispatcher died N times while running this submission". Return their names."""


class FolderSource(Ledger):
    """The standalone source: the event's ledger, fed by its submissions folder
    (``runner.submissions`` says which folders are taken in)."""

    def __init__(self, config: EventConfig):
        super().__init__(config.ledger_path)
        self.submissions_dir = Path(config.worker.submissions_dir)
        self.max_attempts = config.dispatcher.max_attempts
        self.max_running_per_team = config.dispatcher.max_running_per_team
        self._intake: Intake | None = None
        # While watched: what wakes the dispatcher, and the timer that wakes it when a
        # folder still settling may have become quiet.
        self._wake: Callable[[], None] | None = None
        self._settled: threading.Timer | None = None
        # While watched, the watch of each team folder is added as the folder is found.
        self._watch_team: Callable[[Path], None] | None = None
        self._team_watches: set[str] = set()

    @contextmanager
    def opened(self) -> Iterator[None]:
        """Hold the ledger's lock (one dispatcher per ledger file); close the ledger after."""
        with self, event_lock(self.path):
            yield

    def intake(self) -> None:
        """Record the submission folders that became ready since the last call."""
        if self._intake is None:
            self._intake = Intake(self.submissions_dir, self.names())
        ready = self._intake.ready()
        if ready:
            self.add(ready)
        if self._watch_team is not None:
            for team in self._intake.teams.keys() - self._team_watches:
                self._team_watches.add(team)
                self._watch_team(self.submissions_dir / team)
        delay = self._intake.next_judgement()
        if delay is not None and self._wake is not None:
            if self._settled is not None:
                self._settled.cancel()
            # A little late rather than early: a change time is a clock tick coarse.
            self._settled = threading.Timer(delay + SETTLE_MARGIN_SECONDS, self._wake)
            self._settled.daemon = True
            self._settled.start()

    def claim(self, limit: int, worker: str, max_running_per_team: int | None = None
              ) -> list[str]:
        """Ledger.claim, with the event's ``max_running_per_team``."""
        return super().claim(limit, worker, max_running_per_team or self.max_running_per_team)

    def count_new(self) -> int:
        """Submissions waiting to run: new in the ledger, and folders still being copied
        in (a dispatcher with ``hunger_policy: exit`` waits for them)."""
        pending = len(self._intake.pending) if self._intake is not None else 0
        return super().count_new() + pending

    def recover_abandoned(self, max_attempts: int | None = None) -> list[str]:
        """Ledger.recover_abandoned, bounded by the event's ``max_attempts``."""
        return super().recover_abandoned(max_attempts or self.max_attempts)

    @contextmanager
    def watch(self, wake: Callable[[], None]) -> Iterator[None]:
        """Call ``wake()`` as soon as an entry is created in or renamed into the
        submissions folder (inotify where the system has it, through watchdog)."""
        from watchdog.events import (
            DirCreatedEvent,
            DirMovedEvent,
            FileCreatedEvent,
            FileMovedEvent,
            FileSystemEventHandler,
        )
        from watchdog.observers import Observer

        source = self

        class Arrivals(FileSystemEventHandler):
            def on_created(self, event):
                wake()

            def on_moved(self, event):
                name = Path(os.fsdecode(event.dest_path))
                if source._intake is not None:
                    if name.parent == source.submissions_dir:
                        source._intake.arrived_by_rename(name.name)
                    elif name.parent.parent == source.submissions_dir:
                        source._intake.arrived_by_rename(f"{name.parent.name}/{name.name}")
                wake()

        self._wake = wake
        observer = Observer()
        arrivals = Arrivals()

        def watch_folder(folder: Path) -> None:
            # Only arrivals: the default mask also wakes the watch on every open and read
            # of an entry (IN_OPEN, IN_CLOSE_NOWRITE), i.e. at each run's copy. Not
            # recursive: a watch for each submission's every subfolder costs inotify
            # watches and wakes the dispatcher at each file a copy writes.
            observer.schedule(arrivals, str(folder), recursive=False,
                              event_filter=[DirCreatedEvent, FileCreatedEvent, DirMovedEvent,
                                            FileMovedEvent])

        def watch_team(folder: Path) -> None:
            try:
                watch_folder(folder)
            except OSError as error:
                logger.warning("cannot watch team folder %s (%s): its new submissions are "
                               "noticed at the next rescan", folder, error)

        try:
            self.submissions_dir.mkdir(parents=True, exist_ok=True)
            watch_folder(self.submissions_dir)
            observer.start()
            self._team_watches = set()  # the next intake watches every team folder
            self._watch_team = watch_team
        except OSError as error:  # e.g. the inotify watch limit: the rescans still run
            logger.warning("cannot watch %s (%s): new submissions are noticed at the next "
                           "rescan", self.submissions_dir, error)
            observer = None
        try:
            yield
        finally:
            self._wake = None
            self._watch_team = None
            if self._settled is not None:
                self._settled.cancel()
            if observer is not None:
                observer.stop()
                observer.join()

    def record_run(self, name: str, run_time: float | None, peak_memory_mb: float | None,
                   results: RunResults, output_dir: Path) -> None:
        """The run succeeded: ``tested`` then ``scored``, one commit for both."""
        self.mark_tested_and_scored(name, run_time, peak_memory_mb, results.bagged_scores,
                                    _times(results))


def _times(results: RunResults) -> dict[str, float]:
    return {"train": results.train_time, "valid": results.valid_time,
            "test": results.test_time}
