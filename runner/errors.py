"""Who is at fault when a run ends without scores: the outcomes the dispatcher records.

Workers raise these on purpose; the dispatcher maps each to one state, so what becomes of a
submission depends on what happened, not on which library raised what.
"""

from __future__ import annotations

from pathlib import Path


class SubmissionError(Exception):
    """The participant's code failed or left unusable results: ``training_error``."""


class EventError(ValueError):
    """The event's configuration or files cannot be used: ``checking_error``, not retried."""


class InfrastructureError(RuntimeError):
    """The machine, the network or the cloud failed: the submission is run again."""


class LedgerError(EventError):
    """The ledger file cannot be used (not SQLite, read-only, disk full, deleted or replaced
    while in use): one line naming the file. Nothing the dispatcher does next can be
    recorded, so it stops. Here rather than in the ledger: the event's lock, which every
    source holds, is taken on that file too."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
