"""LocalRun.stop: the supervisor is asked first (SIGTERM: it ends its run and removes its
cgroup), then whatever is left is SIGKILLed after a short grace."""

from __future__ import annotations

import os
import signal
import sys
import time

import psutil

from runner import supervise
from runner.local import process
from runner.local.process import LocalRun
from runner.sandbox import LIMITS, Confinement

SLEEPER = [sys.executable, "-c", "import time; print('UP', flush=True); time.sleep(3600)"]


def _started(tmp_path) -> LocalRun:
    """A supervised sleeper with a memory limit (so a cgroup of its own), once it runs."""
    confinement = Confinement(sandbox=False, network=False, read_only=(), writable=(),
                              hidden=(), tmp=str(tmp_path / "tmp"),
                              limits={**dict.fromkeys(LIMITS, 100), "memory_limit_mb": 300})
    run = LocalRun(SLEEPER, dict(os.environ), tmp_path / "log", confinement=confinement)
    deadline = time.monotonic() + 30
    while b"UP" not in (tmp_path / "log").read_bytes():
        assert time.monotonic() < deadline and run.returncode is None
        time.sleep(0.05)
    return run


def _group(pid: int) -> list[str]:
    return [name for name in os.listdir("/sys/fs/cgroup/memory")
            if name.startswith(f"{supervise.GROUP_PREFIX}{pid}-")]


def test_stop_asks_the_supervisor_first_and_it_cleans_up_after_itself(tmp_path):
    run = _started(tmp_path)
    tree = psutil.Process(run.pid).children(recursive=True)
    assert tree and _group(run.pid)
    run.stop()
    # Ended by its own SIGTERM path (exit 128 + 15), not killed: its cgroup is gone with it.
    assert run.returncode == 128 + signal.SIGTERM
    assert _group(run.pid) == []
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree)


def test_a_supervisor_that_does_not_end_is_killed_after_the_grace(tmp_path, monkeypatch):
    monkeypatch.setattr(process, "STOP_GRACE_SECONDS", 0.5)
    run = _started(tmp_path)
    tree = psutil.Process(run.pid).children(recursive=True)
    os.kill(run.pid, signal.SIGSTOP)  # a supervisor that cannot answer
    run.stop()
    assert run.returncode == -signal.SIGKILL
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree)
    # The group of a supervisor killed outright is reaped by the next one on the host.
    supervise.reap_stale_groups()
    assert _group(run.pid) == []
