"""Who is at fault when a run ends without scores: the outcomes the dispatcher records.

Workers raise these on purpose; the dispatcher maps each to one state, so what becomes of a
submission depends on what happened, not on which library raised what. The command line
turns any ``RunnerError`` into one line and its ``exit_code`` (runner.cli).
"""

from __future__ import annotations

from pathlib import Path


class RunnerError(Exception):
    """An error ramp-runner explains in one line that names what is at fault: the command
    line prints its message, not a traceback, and exits with ``exit_code``."""

    exit_code = 1


class SubmissionError(RunnerError):
    """The participant's code failed or left unusable results: ``training_error``."""


class EventError(RunnerError, ValueError):
    """The event's configuration or files cannot be used: ``checking_error``, not retried."""

    exit_code = 2


class ConfigError(EventError):
    """An event configuration that cannot be used, with where and why."""

    def __init__(self, source: str, key_path: str, expected: str, got: str | None = None):
        self.source, self.key_path, self.expected = source, key_path, expected
        message = f"{source}: {key_path}: expected {expected}"
        if got is not None:
            message += f", got {got}"
        super().__init__(message)


class InfrastructureError(RunnerError, RuntimeError):
    """The machine, the network or the cloud failed: the submission is run again."""


class LedgerError(EventError):
    """The ledger file cannot be used (not SQLite, read-only, disk full, deleted or replaced
    while in use): one line naming the file. Nothing the dispatcher does next can be
    recorded, so it stops. Here rather than in the ledger: the event's lock, which every
    source holds, is taken on that file too."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
