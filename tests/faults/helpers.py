"""What the fault tests share: real dispatchers in their own processes, real mounts."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from runner.ledger import Ledger

REPO = Path(__file__).resolve().parents[2]
RAMP_RUNNER = str(Path(sys.executable).parent / "ramp-runner")


def processes_under(root: Path) -> list[psutil.Process]:
    """Live processes whose command line mentions ``root`` (the test's own event)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["status"] == psutil.STATUS_ZOMBIE or process.pid == os.getpid():
            continue
        if any(str(root) in part for part in process.info["cmdline"] or ()):
            found.append(process)
    return found


def wait_until_gone(root: Path, seconds: float = 10) -> list[psutil.Process]:
    """Wait for the event's processes to end; return those still alive after ``seconds``."""
    deadline = time.monotonic() + seconds
    while processes_under(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    return processes_under(root)


def dispatch(config_path: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """``ramp-runner dispatch`` as an organiser runs it (output captured)."""
    return subprocess.run([RAMP_RUNNER, "dispatch", "-e", str(config_path)],
                          capture_output=True, text=True, timeout=timeout, check=False,
                          start_new_session=True)


def start_dispatch(config_path: Path) -> subprocess.Popen:
    """``ramp-runner dispatch`` in the background, output captured."""
    return subprocess.Popen([RAMP_RUNNER, "dispatch", "-e", str(config_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


# A dispatcher whose source method ``method`` SIGKILLs it, ``when`` = before or after the
# real call: a dispatcher dying at an exact point of a submission's life.
_KILLING = textwrap.dedent("""
    import os, signal, sys
    from runner.config import load_event_config
    from runner.dispatcher import Dispatcher
    from runner.source import FolderSource

    path, method, when = sys.argv[1:4]
    real = getattr(FolderSource, method)

    def dying(self, *args, **kwargs):
        if when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(FolderSource, method, dying)
    Dispatcher(load_event_config(path)).run()
""")


def dispatch_killed_at(config_path: Path, method: str, when: str) -> int:
    """Run a dispatcher that SIGKILLs itself at ``FolderSource.<method>``; its exit code."""
    completed = subprocess.run([sys.executable, "-c", _KILLING, str(config_path), method, when],
                               cwd=REPO, capture_output=True, text=True, timeout=180,
                               check=False, start_new_session=True)
    return completed.returncode


def wait_for_state(ledger_path: Path, state: str, timeout: float = 60) -> None:
    """Wait until some submission of the ledger is in ``state``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ledger_path.exists():
            with contextlib.closing(sqlite3.connect(ledger_path)) as db:
                try:
                    if db.execute("SELECT 1 FROM submissions WHERE state = ?",
                                  (state,)).fetchone():
                        return
                except sqlite3.OperationalError:
                    pass  # the schema is being created
        time.sleep(0.1)
    raise AssertionError(f"no submission reached {state!r} within {timeout} s")


def states(ledger_path: Path) -> dict[str, tuple[str, int, str]]:
    """``name -> (state, attempts, error_msg)`` of every submission."""
    with Ledger(ledger_path) as ledger:
        return {s.name: (s.state, s.attempts, s.error_msg) for s in ledger.all()}


def scored_transitions(ledger_path: Path) -> dict[str, int]:
    """How many times each submission was scored."""
    with Ledger(ledger_path) as ledger:
        return {s.name: sum(1 for t in ledger.transitions(s.name) if t.to_state == "scored")
                for s in ledger.all()}


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "1m", options: str = "") -> Iterator[Path]:
    """A small tmpfs mounted at ``folder`` (root only; fails, never skips, without it)."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs",
                    str(folder)], check=True, capture_output=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> None:
    """Fill the file system of ``folder`` to the last byte."""
    with open(folder / "filler", "wb") as handle:
        chunk = b"\0" * 65536
        with contextlib.suppress(OSError):
            while True:
                handle.write(chunk)
                handle.flush()
    with contextlib.suppress(OSError), open(folder / "filler-tail", "wb") as handle:
        while True:
            handle.write(b"\0")
            handle.flush()


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL a background dispatcher and its session."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
