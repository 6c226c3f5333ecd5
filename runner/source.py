"""Where a dispatcher's submissions come from and where their states go.

The dispatcher speaks to one ``SubmissionSource``: the standalone ledger fed by the event's
submissions folder (``FolderSource``, here), or a RAMP board's database
(``runner.rampdb``). Every method is one short transaction that checks the state it
starts from, so a submission is never claimed twice nor scored twice.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

from runner import submissions
from runner.config import EventConfig
from runner.ledger import Ledger
from runner.ramptest import RunResults


class DispatcherBusy(RuntimeError):
    """Another dispatcher already runs this event."""


class SubmissionSource(Protocol):
    """The submission store a dispatcher claims from and records to."""

    def opened(self) -> AbstractContextManager[None]:
        """Hold the event for this dispatcher (DispatcherBusy if another has it) and the
        store's connection, for the dispatcher's whole run."""

    def intake(self) -> None:
        """Take in submissions that arrived since the last call."""

    def count_new(self) -> int:
        """How many submissions wait to be run."""

    def claim(self, limit: int, worker: str) -> list[str]:
        """Move up to ``limit`` waiting submissions, oldest first, to ``sent_to_training``."""

    def still_claimed(self, name: str, worker: str) -> bool:
        """Whether ``name`` is still running under ``worker`` (nobody else changed it)."""

    def mark_training(self, name: str) -> None:
        """The worker is set up and the run starts."""

    def mark_tested(self, name: str, run_time: float | None,
                    peak_memory_mb: float | None) -> None:
        """The run succeeded and its output was collected."""

    def record_scores(self, name: str, results: RunResults, output_dir: Path) -> None:
        """Store the scores and times read from ``output_dir``; the submission is scored."""

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
        """Put back what a dead dispatcher left running; return their names."""


class FolderSource(Ledger):
    """The standalone source: the event's ledger, fed by its submissions folder."""

    def __init__(self, config: EventConfig):
        super().__init__(config.ledger_path)
        self.submissions_dir = Path(config.worker.submissions_dir)

    @contextmanager
    def opened(self) -> Iterator[None]:
        """Hold the ledger's lock (one dispatcher per ledger); close the ledger after."""
        with self, exclusive(self.path):
            yield

    def intake(self) -> None:
        """Record the submission folders not in the ledger yet."""
        self.add(submissions.discover(self.submissions_dir))

    def record_scores(self, name: str, results: RunResults, output_dir: Path) -> None:
        """Store the bagged scores and the summed times of the run."""
        times = {"train": results.train_time, "valid": results.valid_time,
                 "test": results.test_time}
        self.mark_scored(name, results.bagged_scores, times)


@contextmanager
def exclusive(ledger_path: Path) -> Iterator[None]:
    """Hold the event's lock: two dispatchers on one ledger would steal each other's runs."""
    lock_path = Path(str(ledger_path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DispatcherBusy(
                f"another dispatcher is running this event (lock {lock_path})"
            ) from None
        yield
