"""The supervisor's sandbox and limits on their own, and the untrusted copy of results."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from runner import sandbox, supervise
from runner.errors import EventError, SubmissionError
from runner.results import install_predictions

MIB = 1024 * 1024


def _supervised(tmp_path: Path, *options: str, code: str) -> tuple[int, bytes, dict | None]:
    reason = tmp_path / "reason"
    log = tmp_path / "log"
    with open(log, "wb") as handle:
        returncode = subprocess.run(
            [sys.executable, supervise.__file__, "--reason", str(reason), *options, "--",
             sys.executable, "-c", code], stdout=handle, stderr=subprocess.STDOUT,
            timeout=60, check=False).returncode
    import json
    return returncode, log.read_bytes(), (json.loads(reason.read_text())
                                          if reason.exists() else None)


def test_the_sandbox_works_on_this_machine():
    assert sandbox.available(), sandbox.probe()[1]


def test_required_without_a_sandbox_is_the_events_error(monkeypatch):
    monkeypatch.setattr(sandbox, "probe", lambda: (False, "bwrap missing here"))
    with pytest.raises(EventError, match="worker.sandbox: required.*bwrap missing here"):
        sandbox.use_sandbox("required", "Test")
    assert sandbox.use_sandbox("off", "Test") is False


def test_auto_without_a_sandbox_warns_loudly(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "probe", lambda: (False, "bwrap missing here"))
    assert sandbox.use_sandbox("auto", "WarnedWorker") is False
    assert "submissions are NOT isolated" in caplog.text


def test_sandboxed_command_runs_unprivileged_in_its_own_pid_namespace(tmp_path):
    code = ("import os; print('UID', os.getuid(), 'PID', os.getpid(), "
            "'SEES', sorted(p for p in os.listdir('/proc') if p.isdigit()))")
    returncode, log, reason = _supervised(tmp_path, "--sandbox", "--tmp", str(tmp_path / "t"),
                                          code=code)
    assert (returncode, reason) == (0, None), log
    words = log.decode().split()
    assert words[1] != "0" and int(words[3]) <= 3
    assert str(os.getpid()) not in log.decode().split("SEES", 1)[1]


def test_log_keeps_head_and_tail_and_stops_the_run(tmp_path):
    code = "import sys\nfor i in range(100000): print(f'line {i} ' + 'x' * 100)"
    returncode, log, reason = _supervised(tmp_path, "--log-limit-mb", "1", code=code)
    assert returncode != 0 and reason["limit"] == "log_limit_mb"
    assert len(log) < 1.1 * MIB
    assert log.startswith(b"line 0 ") and b"bytes of output cut here" in log


def test_a_starter_already_gone_starts_nothing(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process now
    marker = tmp_path / "ran"
    returncode, _, _ = _supervised(tmp_path, "--watch", str(gone.pid),
                                   code=f"open({str(marker)!r}, 'w')")
    assert returncode == 128 + signal.SIGKILL
    assert not marker.exists()


def test_a_setsid_double_fork_dies_with_the_run_even_without_the_sandbox(tmp_path):
    code = ("import os, time\nif os.fork() == 0:\n os.setsid()\n if os.fork() == 0:\n"
            "  time.sleep(3600)\n os._exit(0)\nos.wait(); print('PARENT DONE')")
    before = {p.pid for p in psutil.process_iter()}
    returncode, log, _ = _supervised(tmp_path, code=code)
    assert returncode == 0 and b"PARENT DONE" in log
    sleepers = [p for p in psutil.process_iter(["cmdline"]) if p.pid not in before
                and "time.sleep(3600)" in " ".join(p.info["cmdline"] or ())]
    assert sleepers == []


def test_copy_refuses_links_fifos_and_sparse_files(tmp_path):
    target = tmp_path / "predictions" / "sub"
    for name, make in [("link", lambda p: p.symlink_to("/dev/zero")),
                       ("fifo", os.mkfifo),
                       ("sparse", lambda p: os.truncate(p.open("wb").name, 1 << 40))]:
        source = tmp_path / f"out-{name}"
        source.mkdir()
        (source / "fold_0").mkdir()
        make(source / "fold_0" / name)
        with pytest.raises(SubmissionError, match="symbolic link|FIFO|output_limit_mb"):
            install_predictions(source, target, 64 * MIB)
        assert not target.exists()
        assert not list(target.parent.glob(".*incoming*"))
