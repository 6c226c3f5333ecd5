"""SSHWorker against a real sshd on 127.0.0.1 running real ramp-test of the iris kit."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from runner import ramptest
from runner.config import load_event_config
from runner.dispatcher import Dispatcher
from runner.ledger import Ledger
from runner.ssh import worker as ssh_module
from runner.ssh.session import HostKeyError
from runner.ssh.worker import SSHWorker
from tests.events import make_event
from tests.sshd import (
    FAULTS,
    dispatch_within,
    inject_fault,
    remote_dispatcher,
    session_members,
    ssh_worker_section,
)


def _worker(tmp_path, sshd, remote_kit, submission, **more):
    path = make_event(tmp_path / "event", (submission,),
                      worker=ssh_worker_section(sshd, remote_kit, **more),
                      dispatcher=remote_dispatcher())
    config = load_event_config(path)
    return SSHWorker(config.worker_dict(dispatcher_id="test"), submission), config


def _run_until_done(worker, limit=120):
    deadline = time.monotonic() + limit
    while worker.status == "running":
        assert time.monotonic() < deadline
        worker.wait(1)


def test_dispatch_over_ssh_scores_and_errors(tmp_path, sshd, remote_kit):
    path = make_event(tmp_path / "event", ("starting_kit", "raising_error"),
                      worker=ssh_worker_section(sshd, remote_kit),
                      dispatcher=remote_dispatcher(n_workers=2))
    config = load_event_config(path)
    Dispatcher(config).run()
    with Ledger(config.ledger_path) as ledger:
        good, bad = ledger.get("starting_kit"), ledger.get("raising_error")
    assert good.state == "scored", good.error_msg
    assert good.scores["test"]["acc"] > 0.5
    assert bad.state == "training_error"
    assert "Traceback" in bad.error_msg and "RuntimeError" in bad.error_msg
    logs = Path(config.worker.logs_dir)
    assert "Bagged scores" in (logs / "starting_kit" / "log").read_text()
    assert (Path(config.worker.predictions_dir) / "starting_kit" / "bagged_scores.csv").exists()
    assert not (Path(config.worker.predictions_dir) / "raising_error").exists()
    # Nothing left on the host, and the event's known_hosts has the host.
    assert list((remote_kit / ".ramp-runner").iterdir()) == []
    assert list((remote_kit / "submissions").iterdir()) == []
    assert f"[{sshd.host}]:{sshd.port}" in (path.parent / "known_hosts").read_text()


def test_peak_memory_and_upload_of_only_the_submission(tmp_path, sshd, remote_kit):
    worker, config = _worker(tmp_path, sshd, remote_kit, "starting_kit")
    local = Path(config.worker.submissions_dir) / "starting_kit"
    (local / "training_output").mkdir()
    (local / "training_output" / "stale.txt").write_text("from an earlier local run")
    worker.setup()
    try:
        uploaded = remote_kit / "submissions" / "starting_kit"
        assert sorted(p.name for p in uploaded.iterdir()) == sorted(
            p.name for p in local.iterdir() if p.name != "training_output")
        assert sorted(p.name for p in (remote_kit / "submissions").iterdir()) == ["starting_kit"]
        worker.launch_submission()
        _run_until_done(worker)
        returncode, error_msg = worker.collect_results()
    finally:
        worker.teardown()
    assert (returncode, error_msg) == (0, "")
    assert worker.peak_memory_mb and 10 < worker.peak_memory_mb < 4000
    assert not (Path(config.worker.predictions_dir) / "starting_kit" / "stale.txt").exists()
    assert worker.status == "killed"
    assert worker.session.connections == 1


def test_timeout_kills_the_remote_tree(tmp_path, sshd, remote_kit):
    worker, config = _worker(tmp_path, sshd, remote_kit, "hanging", timeout=4)
    worker.setup()
    try:
        worker.launch_submission()
        _run_until_done(worker)
        assert worker.status == "timeout"
        sid = int((remote_kit / ".ramp-runner" / "hanging" / "pid").read_text())
        assert len(session_members(sid)) >= 3  # wrapper, ramp-test, its forked child
        returncode, error_msg = worker.collect_results()
        assert session_members(sid) == []
    finally:
        worker.teardown()
    assert returncode == ramptest.TIMEOUT_RETURNCODE
    assert error_msg == ramptest.timeout_message(4)
    assert (Path(config.worker.logs_dir) / "hanging" / "log").exists()


def test_a_run_killed_at_its_timeout_leaves_no_mount_on_the_host(tmp_path, sshd, remote_kit):
    worker, _ = _worker(tmp_path, sshd, remote_kit, "hanging", timeout=4, output_limit_mb=64)
    run = remote_kit / ".ramp-runner" / "hanging"
    own = remote_kit / "submissions" / "hanging"
    worker.setup()
    try:
        worker.launch_submission()
        supervisor = _remote_supervisor(run)
        # The run's disk: its tmp and its submission folder, seen by its supervisor only.
        with open(f"/proc/{supervisor.pid}/mounts") as handle:
            disk = {line.split()[1]: line.split()[3] for line in handle
                    if line.split()[1] in (str(run / "tmp"), str(own))}
        assert sorted(disk) == sorted([str(run / "tmp"), str(own)]), disk
        assert "size=65536k" in disk[str(run / "tmp")]
        assert _host_mounts_under(remote_kit) == []
        _run_until_done(worker)
        assert worker.status == "timeout"
        worker.collect_results()
        assert not supervisor.is_running() or supervisor.status() == psutil.STATUS_ZOMBIE
    finally:
        worker.teardown()
    assert _host_mounts_under(remote_kit) == []
    assert not run.exists() and not own.exists()


def _remote_supervisor(run: Path) -> psutil.Process:
    """The supervisor of the run in the host's folder ``run``, once it has started."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for process in psutil.process_iter(["cmdline"]):
            if f"{run}/supervise.py" in (process.info["cmdline"] or []):
                with open(f"/proc/{process.pid}/mounts") as handle:
                    if f" {run}/tmp " in handle.read():
                        return process
        time.sleep(0.1)
    raise AssertionError(f"no supervisor with its disk mounted for {run}")


def _host_mounts_under(folder: Path) -> list[str]:
    with open("/proc/self/mounts") as handle:
        points = [line.split()[1] for line in handle]
    return [p for p in points if p.startswith(f"{folder}/")]


def test_kill_from_the_dispatcher_stops_the_run(tmp_path, sshd, remote_kit):
    worker, _ = _worker(tmp_path, sshd, remote_kit, "hanging", timeout=60)
    worker.setup()
    try:
        worker.launch_submission()
        pid_file = remote_kit / ".ramp-runner" / "hanging" / "pid"
        sid = int(pid_file.read_text())
        deadline = time.monotonic() + 30
        while len(session_members(sid)) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        worker.kill()
        assert worker.status == "killed"
        assert session_members(sid) == []
    finally:
        worker.teardown()


def test_strict_host_keys_refuse_an_unknown_host(tmp_path, sshd, remote_kit):
    worker, config = _worker(tmp_path, sshd, remote_kit, "starting_kit",
                             strict_host_key_checking=True)
    with pytest.raises(HostKeyError):
        worker.setup()
    worker.teardown()
    assert not ssh_module.host_in_use(config.worker.hosts[0])  # the host was released


def test_reap_kills_runs_a_dead_dispatcher_left(tmp_path, sshd, remote_kit):
    worker, config = _worker(tmp_path, sshd, remote_kit, "hanging", timeout=600)
    worker.setup()
    worker.launch_submission()
    sid = int((remote_kit / ".ramp-runner" / "hanging" / "pid").read_text())
    # The dispatcher "dies": its connection drops, its claim on the host goes with it.
    worker.session.close()
    worker._release_host()
    worker_dict = config.worker_dict(dispatcher_id="next")
    assert SSHWorker.reap_leftovers(worker_dict, dry_run=True) == [
        f"{sshd.host}:{sshd.port}:hanging"]
    assert session_members(sid)
    assert SSHWorker.reap_leftovers(worker_dict) == [f"{sshd.host}:{sshd.port}:hanging"]
    assert session_members(sid) == []
    assert not (remote_kit / ".ramp-runner" / "hanging").exists()
    assert not (remote_kit / "submissions" / "hanging").exists()


@pytest.mark.parametrize("fault", FAULTS)
def test_a_failed_poll_or_collect_releases_the_host(tmp_path, sshd, remote_kit, monkeypatch,
                                                    fault):
    inject_fault(monkeypatch, fault, remote_kit)
    path = make_event(tmp_path / "event", ("starting_kit",),
                      worker=ssh_worker_section(sshd, remote_kit),
                      dispatcher=remote_dispatcher(max_attempts=1))
    config = load_event_config(path)
    dispatch_within(config, 120, fault)
    with Ledger(config.ledger_path) as ledger:
        submission = ledger.get("starting_kit")
    assert submission.state == "checking_error", submission.error_msg
    assert not ssh_module.host_in_use(config.worker.hosts[0])
    # The run is stopped and its files are gone from the host.
    assert list((remote_kit / ".ramp-runner").iterdir()) == []
    assert list((remote_kit / "submissions").iterdir()) == []
