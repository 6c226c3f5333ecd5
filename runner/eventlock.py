"""One dispatcher per event, whatever source it runs from.

Every source holds the event's lock while a dispatcher runs: the standalone ledger and a
RAMP board alike, so this lives apart from both (the board's source keeps no ledger; the
ledger file is only where its lock is taken).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runner.errors import LedgerError, RunnerError


class DispatcherBusy(RunnerError, RuntimeError):
    """Another dispatcher already runs this event."""

    exit_code = 2


@contextmanager
def event_lock(ledger_path: Path) -> Iterator[None]:
    """Hold the event's lock: two dispatchers on one ledger would steal each other's runs.

    The lock is taken on the ledger file itself (created empty when missing: an empty file
    is an empty SQLite database), so it is keyed by the file's identity, not by how its path
    is spelled: a symlink, a hard link or ``..`` in the path reach the same lock. flock and
    SQLite's own (POSIX) locks do not interact on a local file system, where a ledger
    in WAL mode must live anyway.
    """
    ledger_path = Path(ledger_path)
    try:
        ledger_path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(ledger_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise LedgerError(ledger_path, f"cannot open it to lock the event "
                                       f"({error.strerror})") from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DispatcherBusy(
                f"another dispatcher is running this event (it holds the lock on "
                f"{os.path.realpath(ledger_path)})"
            ) from None
        yield
    finally:
        os.close(descriptor)
