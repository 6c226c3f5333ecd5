"""Runs as a user without sudo (issue 20, point 4): ``run_as_user`` on a remote worker, the
AWS default ``ramp-run`` as the AMI makes it (ami/worker-guard.yml).

The host is a real sshd of tests/sshd.py logging in as a user with passwordless sudo, as
``ubuntu`` on an AMI; both users are made on this machine. The kit (the login user's) and the
Python both users execute live in a folder of this module under /tmp that any user may read:
pytest's own folders are root's alone (0700), as is the tests' interpreter in root's home.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from runner import ramptest
from runner.aws import ec2
from runner.aws.worker import AWSWorker
from runner.config import load_event_config
from runner.dispatcher import Dispatcher
from runner.errors import ConfigError
from runner.ledger import Ledger
from runner.ssh.worker import SSHWorker
from tests import hostile
from tests.events import make_event
from tests.sshd import (
    RUN_USER,
    all_instances,
    aws_worker_section,
    ensure_run_user,
    ensure_sudo_user,
    live_instances,
    readable_python,
    remote_dispatcher,
    running_sshd,
    session_members,
    ssh_worker_section,
)

HEARTBEAT = Path(AWSWorker.heartbeat_file)
# A variable of the login user's sessions (as a token in its environment would be).
LOGIN_SECRET = ("RAMP_LOGIN_SECRET", "login-secret-5c2a")


@pytest.fixture(scope="module")
def run_user():
    """The run user's passwd entry."""
    return ensure_run_user()


@pytest.fixture(scope="module")
def login_user():
    """The login user's passwd entry (passwordless sudo)."""
    return ensure_sudo_user()


@pytest.fixture(scope="module")
def folder():
    """This module's folder under /tmp, readable by every user; removed at the end."""
    made = Path(tempfile.mkdtemp(prefix="ramp-run-test-", dir="/tmp"))
    made.chmod(0o755)
    yield made
    shutil.rmtree(made)


@pytest.fixture(scope="module")
def host(folder, login_user):
    """An sshd whose key logs in as the login user."""
    (folder / "sshd").mkdir(mode=0o755)
    with running_sshd(folder / "sshd", user=login_user.pw_name,
                      environment=dict([LOGIN_SECRET])) as server:
        yield server


@pytest.fixture(scope="module")
def shared(folder, remote_kit, run_user, login_user):
    """(kit, the run's PATH prefix): a copy of the host kit, the login user's, and a Python
    with ramp-test, both readable (not writable) by the run user."""
    kit = folder / "iris"
    shutil.copytree(remote_kit, kit, ignore=shutil.ignore_patterns("submissions"))
    (kit / "submissions").mkdir()
    for path in [kit, *kit.rglob("*")]:
        os.chown(path, login_user.pw_uid, login_user.pw_gid)
    return kit, f"{readable_python(folder / 'python')}"


@pytest.fixture
def instance_at_host(instance_at_sshd, host, monkeypatch):
    """Every launched instance answers at this module's sshd."""
    monkeypatch.setattr(ec2, "instance_address", lambda client, instance_id: (host.host,
                                                                              host.port))
    return instance_at_sshd


def probe(kit: Path) -> str:
    """Says who it runs as and what it can reach: sudo, the heartbeat, the kit; then
    trains as usual."""
    return hostile.PRELUDE + f'''
def attack_in_fit():
    run = f("sub" + "process", "r", "un")
    say("RUNAS: uid", OS.getuid())
    say("RUNAS: sudo exit", run(["sudo", "-n", "true"], capture_output=True).returncode)
    say("RUNAS: sudo variables", sorted(k for k in OS.environ if k.startswith("SUDO")))
    say("RUNAS: home", OS.environ.get("HOME"))
    say("RUNAS: login secret", OS.environ.get({LOGIN_SECRET[0]!r}))
    attempt("RUNAS: touch heartbeat", lambda: f("o" + "s", "ut", "ime")({str(HEARTBEAT)!r}))
    attempt("RUNAS: write heartbeat", lambda: OPEN({str(HEARTBEAT)!r}, "ab").write(b"x"))
    attempt("RUNAS: write kit", lambda: OPEN({str(kit / "problem.py")!r}, "ab").write(b"#x"))
'''


def _rows(config) -> dict:
    with Ledger(config.ledger_path) as ledger:
        return {row.name: row for row in ledger.all()}


def _run_user_processes(uid: int) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["uids", "status"])
            if p.info["uids"] and p.info["uids"].real == uid
            and p.info["status"] != psutil.STATUS_ZOMBIE]


def test_an_aws_run_outside_the_sandbox_has_no_sudo_nor_the_heartbeat(
        tmp_path, host, shared, run_user, login_user, instance_at_host):
    kit, python = shared
    # The AMI's heartbeat (its tmpfiles rule): a root folder, a file of the login user.
    HEARTBEAT.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    HEARTBEAT.touch()
    os.chown(HEARTBEAT, login_user.pw_uid, login_user.pw_gid)
    before = HEARTBEAT.stat().st_mtime
    section = aws_worker_section(host, kit, remote_path_prefix=python, sandbox="off")
    del section["run_as_user"]  # the AWS default
    path = make_event(tmp_path / "event", ("starting_kit",), worker=section,
                      dispatcher=remote_dispatcher())
    hostile.add_submission(path.parent / "submissions", "x_probe", probe(kit))
    config = load_event_config(path)
    assert config.worker.run_as_user == RUN_USER
    Dispatcher(config).run()
    rows = _rows(config)

    assert rows["starting_kit"].state == "scored", rows["starting_kit"].error_msg
    assert rows["starting_kit"].scores
    assert rows["x_probe"].state == "scored", rows["x_probe"].error_msg
    log = (Path(config.worker.logs_dir) / "x_probe" / "log").read_text(errors="replace")
    assert f"RUNAS: uid {run_user.pw_uid}" in log
    assert "RUNAS: sudo exit 1" in log
    assert "RUNAS: sudo variables []" in log
    assert f"RUNAS: home {run_user.pw_dir}" in log
    assert "RUNAS: login secret None" in log and LOGIN_SECRET[1] not in log
    assert "RUNAS: touch heartbeat DENIED PermissionError" in log
    assert "RUNAS: write heartbeat DENIED PermissionError" in log
    assert "RUNAS: write kit DENIED PermissionError" in log
    assert not (kit / "problem.py").read_text().endswith("#x")
    # The login user's polls kept the heartbeat going.
    assert HEARTBEAT.stat().st_mtime >= before
    assert HEARTBEAT.stat().st_uid == login_user.pw_uid
    assert live_instances(instance_at_host) == []
    # Handed back to the login user at collection (the instance goes with them on AWS).
    left = [p for folder in ("submissions", ".ramp-runner") for p in (kit / folder).rglob("*")]
    assert any(p.name == "bagged_scores.csv" for p in left)
    assert [p for p in left if p.lstat().st_uid != login_user.pw_uid] == []
    _forget_runs(kit)


def test_a_reused_instance_runs_each_submission_as_the_run_user(
        tmp_path, host, shared, run_user, login_user, instance_at_host):
    kit, python = shared
    section = aws_worker_section(host, kit, remote_path_prefix=python, sandbox="required",
                                 reuse_instances={"max_runs": 3, "idle_minutes": 1})
    del section["run_as_user"]  # the AWS default
    path = make_event(tmp_path / "event", ("starting_kit", "random_forest"), worker=section,
                      dispatcher=remote_dispatcher())
    config = load_event_config(path)
    assert config.worker.run_as_user == RUN_USER
    Dispatcher(config).run()
    rows = _rows(config)

    assert {name: row.state for name, row in rows.items()} == {
        "starting_kit": "scored", "random_forest": "scored"}, rows
    assert len(all_instances(instance_at_host)) == 1  # the second run took the first's
    assert live_instances(instance_at_host) == []  # the dispatcher's shutdown ended it
    assert _run_user_processes(run_user.pw_uid) == []
    # Wiped between the runs, as root: nothing of either run is left on the host.
    assert [p for folder in ("submissions", ".ramp-runner") for p in (kit / folder).rglob("*")
            if p.lstat().st_uid == run_user.pw_uid] == []
    _forget_runs(kit)


def _forget_runs(kit: Path) -> None:
    """Remove what AWS runs left in the shared kit (their instance would have gone)."""
    for folder in ("submissions", ".ramp-runner"):
        for path in (kit / folder).iterdir():
            shutil.rmtree(path)


def test_a_timeout_kills_every_process_of_the_run_user(tmp_path, host, shared, run_user,
                                                       instance_at_host):
    kit, python = shared
    section = aws_worker_section(host, kit, remote_path_prefix=python, sandbox="off",
                                 timeout=4)
    del section["run_as_user"]
    path = make_event(tmp_path / "event", ("hanging",), worker=section,
                      dispatcher=remote_dispatcher())
    config = load_event_config(path)
    worker = AWSWorker(config.worker_dict(dispatcher_id="test"), "hanging")
    worker.setup()
    try:
        worker.launch_submission()
        while worker.status == "running":
            worker.wait(1)
        assert worker.status == "timeout"
        sid = int((kit / ".ramp-runner" / "hanging" / "pid").read_text())
        assert _run_user_processes(run_user.pw_uid), "the run does not run as the run user"
        assert session_members(sid)
        returncode, error_msg = worker.collect_results()
        assert session_members(sid) == []
        assert _run_user_processes(run_user.pw_uid) == []
    finally:
        worker.teardown()
        _forget_runs(kit)
    assert (returncode, error_msg) == (ramptest.TIMEOUT_RETURNCODE,
                                       ramptest.timeout_message(4))


def test_an_ssh_host_runs_a_sandboxed_submission_as_the_run_user(tmp_path, host, shared,
                                                                  run_user):
    kit, python = shared
    path = make_event(tmp_path / "event", ("starting_kit",), worker=ssh_worker_section(
        host, kit, remote_path_prefix=python, sandbox="required", run_as_user=RUN_USER),
        dispatcher=remote_dispatcher())
    hostile.add_submission(path.parent / "submissions", "x_probe", probe(kit))
    config = load_event_config(path)
    Dispatcher(config).run()
    rows = _rows(config)
    assert rows["starting_kit"].state == "scored", rows["starting_kit"].error_msg
    assert rows["starting_kit"].peak_memory_mb > 0
    assert rows["x_probe"].state == "scored", rows["x_probe"].error_msg
    log = (Path(config.worker.logs_dir) / "x_probe" / "log").read_text(errors="replace")
    # In the sandbox's user namespace, as the run user.
    assert f"RUNAS: uid {run_user.pw_uid}" in log
    assert "RUNAS: sudo exit 1" in log
    assert "RUNAS: write kit DENIED" in log
    assert list((kit / "submissions").iterdir()) == []


def test_ssh_runs_as_the_login_user_unless_told(tmp_path, host, shared):
    kit, _ = shared
    path = make_event(tmp_path / "event", (), worker=ssh_worker_section(host, kit))
    assert load_event_config(path).worker.run_as_user is None


def test_a_run_user_that_cannot_be_a_user_name_is_refused(tmp_path, host, shared):
    kit, _ = shared
    path = make_event(tmp_path / "event", (), worker=ssh_worker_section(
        host, kit, run_as_user="ramp run; sudo -s"))
    with pytest.raises(ConfigError, match=r"worker\.run_as_user"):
        load_event_config(path)


def test_a_missing_run_user_is_the_events_error_on_that_host(tmp_path, host, shared):
    kit, python = shared
    path = make_event(tmp_path / "event", ("starting_kit",), worker=ssh_worker_section(
        host, kit, remote_path_prefix=python, run_as_user="ramp-nobody-here"),
        dispatcher=remote_dispatcher(max_attempts=1))
    config = load_event_config(path)
    Dispatcher(config).run()
    row = _rows(config)["starting_kit"]
    assert row.state == "checking_error", (row.state, row.error_msg)
    assert "ramp-nobody-here" in row.error_msg and row.attempts == 0
    assert list((kit / "submissions").iterdir()) == []


def test_hidden_labels_run_as_the_run_user(tmp_path, host, shared):
    kit, python = shared
    path = make_event(tmp_path / "event", ("starting_kit",), worker=ssh_worker_section(
        host, kit, remote_path_prefix=python, hidden_test_labels="auto",
        run_as_user=RUN_USER), dispatcher=remote_dispatcher())
    config = load_event_config(path)
    Dispatcher(config).run()
    row = _rows(config)["starting_kit"]
    assert row.state == "scored", row.error_msg
    assert row.scores["test"]


def test_a_kit_the_run_user_cannot_reach_is_the_events_error(tmp_path, host, shared, folder,
                                                             login_user):
    kit, python = shared
    private = folder / "private"  # the login user's alone, as a home folder often is
    shutil.copytree(kit, private / "iris", ignore=shutil.ignore_patterns(".ramp-runner*"))
    for path in [private, *private.rglob("*")]:
        os.chown(path, login_user.pw_uid, login_user.pw_gid)
    private.chmod(0o700)
    path = make_event(tmp_path / "event", ("starting_kit",), worker=ssh_worker_section(
        host, private / "iris", remote_path_prefix=python, run_as_user=RUN_USER),
        dispatcher=remote_dispatcher(max_attempts=1))
    config = load_event_config(path)
    Dispatcher(config).run()
    row = _rows(config)["starting_kit"]
    assert row.state == "checking_error", (row.state, row.error_msg)
    assert "cannot reach the kit folder" in row.error_msg and row.attempts == 0
    assert list((private / "iris" / "submissions").iterdir()) == []


def test_reap_kills_and_removes_a_run_users_leftover_run(tmp_path, host, shared, run_user):
    kit, python = shared
    path = make_event(tmp_path / "event", ("hanging",), worker=ssh_worker_section(
        host, kit, remote_path_prefix=python, run_as_user=RUN_USER, timeout=600),
        dispatcher=remote_dispatcher())
    config = load_event_config(path)
    worker = SSHWorker(config.worker_dict(dispatcher_id="test"), "hanging")
    worker.setup()
    worker.launch_submission()
    sid = int((kit / ".ramp-runner" / "hanging" / "pid").read_text())
    # The dispatcher "dies": its connection drops, its claim on the host goes with it.
    worker.session.close()
    worker._release_host()
    deadline = time.monotonic() + 30
    while not _run_user_processes(run_user.pw_uid):
        assert time.monotonic() < deadline, "the run never started as the run user"
        time.sleep(0.2)
    reaped = SSHWorker.reap_leftovers(config.worker_dict(dispatcher_id="next"))
    assert reaped == [f"{host.host}:{host.port}:hanging"]
    assert session_members(sid) == []
    assert _run_user_processes(run_user.pw_uid) == []
    assert list((kit / ".ramp-runner").iterdir()) == []
    assert list((kit / "submissions").iterdir()) == []
