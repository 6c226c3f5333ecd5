"""One local ramp-test run: its own process group, its sandbox and limits, its log, its end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from runner import supervise
from runner.results import read_reason
from runner.sandbox import Confinement

KILL_GRACE_SECONDS = 5.0
# How long the supervisor has, after SIGTERM, to end its run and remove its cgroup itself
# (it takes milliseconds) before the whole group is SIGKILLed.
STOP_GRACE_SECONDS = 2.0


class LocalRun:
    """A command started in a new session, stdout+stderr to ``log_path``.

    Everything the command forks stays in its process group, so ``stop`` ends the whole
    tree (and any descendant that left the group is found through its parent links). The
    group also dies with the process that created this object, even by SIGKILL: the
    supervisor leading it watches that process. With a ``confinement``, the supervisor
    also runs the command in the sandbox and ends it at its limits (``stop_reason``).
    The supervisor's own files go to ``aside`` (default: beside the log), so that a log
    written where others read it live (``runner.livelog``) has nothing next to it.
    """

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path,
                 cwd: str | os.PathLike[str] | None = None,
                 confinement: Confinement | None = None, aside: Path | None = None):
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        aside = Path(aside) if aside is not None else self.log_path.parent
        self._memory_path = aside / f"{self.log_path.name}.peak_rss"
        self._reason_path = aside / f"{self.log_path.name}.reason"
        options = confinement.options() if confinement is not None else []
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, supervise.__file__, "--watch", str(os.getpid()),
                 "--peak-rss", str(self._memory_path), "--reason", str(self._reason_path),
                 *options, "--", *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        """The process id of the group leader."""
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit code once ended, else None."""
        return self._proc.poll()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run ends or ``timeout`` passes; return whether it ended."""
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def stop(self) -> None:
        """End the whole process tree (idempotent) and reap the leader: SIGTERM to the
        supervisor, which ends its run and removes its cgroup, then, after
        STOP_GRACE_SECONDS, SIGKILL to whatever is left."""
        try:
            stragglers = psutil.Process(self._proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            stragglers = []
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            self.wait(STOP_GRACE_SECONDS)
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the group is already empty
        for process in stragglers:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self._proc.wait()
        # SIGKILL is delivered asynchronously: return only once the tree is really gone.
        deadline = time.monotonic() + KILL_GRACE_SECONDS
        while time.monotonic() < deadline and any(map(_alive, stragglers)):
            time.sleep(0.02)

    @property
    def peak_memory_mb(self) -> float | None:
        """Peak memory in MiB of the run's whole tree, once it ended normally."""
        try:
            return float(self._memory_path.read_text())
        except (OSError, ValueError):
            return None

    @property
    def stop_reason(self) -> dict[str, str] | None:
        """Why the supervisor ended the run, once it did: ``{"fault": "submission" (a limit)
        or "event" (the sandbox could not start), "message": ...}``; else None."""
        return read_reason(self._reason_path)

    def cleanup(self) -> None:
        """Remove the files the supervisor left beside the log."""
        self._memory_path.unlink(missing_ok=True)
        self._reason_path.unlink(missing_ok=True)


def _alive(process: psutil.Process) -> bool:
    # A zombie is dead; it only waits for a parent (maybe a non-reaping PID 1) to reap it.
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
