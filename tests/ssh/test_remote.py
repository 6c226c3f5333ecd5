"""runner.ssh.session against a real sshd: one connection, tar streams, host keys."""

from __future__ import annotations

import socket
import threading
import time

import paramiko
import pytest

from runner.ssh import session as session_module
from runner.ssh.session import HostKeyError, RemoteSession, forget_host, known_host_name
from tests.sshd import free_port, frozen


def _session(sshd, known_hosts, **more):
    return RemoteSession(sshd.host, sshd.user, sshd.key_path, sshd.port,
                         known_hosts=known_hosts, **more)


def test_first_use_records_the_host_key_and_steps_share_one_connection(sshd, tmp_path, caplog):
    known_hosts = tmp_path / "known_hosts"
    session = _session(sshd, known_hosts)
    session.connect()
    try:
        assert session.run("echo hello")[:2] == (0, "hello\n")
        assert session.run("exit 3")[0] == 3
    finally:
        session.close()
    assert (session.connections, session.round_trips) == (1, 2)
    recorded = paramiko.HostKeys(str(known_hosts))
    name = known_host_name(sshd.host, sshd.port)
    key_type, key_text = sshd.host_public_key.split()[:2]
    assert recorded.lookup(name)[key_type].get_base64() == key_text
    assert "trusting" in caplog.text and name in caplog.text


def test_changed_host_key_is_refused(sshd, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    name = known_host_name(sshd.host, sshd.port)
    impostor = paramiko.Ed25519Key.from_private_key_file(sshd.key_path)  # any other key
    keys = paramiko.HostKeys()
    keys.add(name, impostor.get_name(), impostor)
    keys.save(str(known_hosts))
    session = _session(sshd, known_hosts)
    with pytest.raises(HostKeyError, match="changed"):
        session.connect()
    forget_host(known_hosts, sshd.host, sshd.port)  # what the AWS worker does for a new instance
    session.connect()
    session.close()


def test_strict_checking_refuses_an_unknown_host(sshd, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    with pytest.raises(HostKeyError, match="strict"):
        _session(sshd, known_hosts, strict_host_keys=True).connect()
    assert not known_hosts.exists() or known_hosts.read_text() == ""


def test_upload_and_download_are_single_tar_streams(sshd, tmp_path):
    local = tmp_path / "local"
    (local / "sub" / "deep").mkdir(parents=True)
    (local / "sub" / "a.py").write_text("print('a')\n")
    (local / "sub" / "deep" / "b.bin").write_bytes(bytes(range(256)) * 100)
    remote = tmp_path / "remote"
    session = _session(sshd, tmp_path / "known_hosts")
    session.connect()
    try:
        session.upload([(local / "sub", "sub"), (local / "sub" / "a.py", "sub/a.py"),
                        (local / "sub" / "deep", "sub/deep"),
                        (local / "sub" / "deep" / "b.bin", "sub/deep/b.bin")], str(remote))
        assert (remote / "sub" / "deep" / "b.bin").read_bytes() == bytes(range(256)) * 100
        back = tmp_path / "back"
        back.mkdir()
        session.download(str(remote), "set -- sub/deep", back)
        assert (back / "sub" / "deep" / "b.bin").read_bytes() == bytes(range(256)) * 100
        assert not (back / "sub" / "a.py").exists()
    finally:
        session.close()
    assert (session.connections, session.round_trips) == (1, 2)
    assert 0 < session.bytes_sent < 25600 and 0 < session.bytes_received < 25600  # compressed


def test_connect_gives_up_after_ready_timeout(sshd, tmp_path):
    session = RemoteSession("127.0.0.1", sshd.user, sshd.key_path, free_port(),
                            known_hosts=tmp_path / "known_hosts")
    with pytest.raises(TimeoutError, match="did not answer"):
        session.connect(ready_timeout=3)
    assert session.connections >= 2  # it did retry


# Every SSH step has a deadline of its own: a host that stops answering on an established
# connection (frozen, or a half-open TCP connection) would otherwise block open_session()
# for paramiko's 3600 s channel timeout, and exec_command()/recv_exit_status() forever.
DEADLINE = 2.0


@pytest.fixture
def short_deadlines(monkeypatch):
    for name in ("CONNECT_TIMEOUT", "STEP_TIMEOUT", "STREAM_TIMEOUT"):
        monkeypatch.setattr(session_module, name, DEADLINE)


def _in_thread(step):
    """Run ``step`` in a thread; return (thread, outcome) once it ended or 30 s passed."""
    outcome = {}

    def target():
        try:
            outcome["result"] = step()
        except Exception as error:  # noqa: BLE001 - the test inspects it
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(30)
    outcome["seconds"] = time.monotonic() - started
    return thread, outcome


def _local_port(session):
    return session._connection.transport.sock.getsockname()[1]


@pytest.mark.parametrize("step", ["run", "upload", "download"])
def test_a_frozen_host_fails_each_step_at_its_deadline(sshd, tmp_path, short_deadlines, step):
    session = _session(sshd, tmp_path / "known_hosts")
    session.connect()
    (tmp_path / "file").write_text("x")
    steps = {
        "run": lambda: session.run("echo hello"),
        "upload": lambda: session.upload([(tmp_path / "file", "file")], str(tmp_path / "up")),
        "download": lambda: session.download(str(tmp_path), "set -- file", tmp_path / "down"),
    }
    with frozen(sshd, _local_port(session)):
        thread, outcome = _in_thread(steps[step])
        assert not thread.is_alive(), f"{step} still blocked after 30 s on a frozen host"
    assert isinstance(outcome.get("error"), TimeoutError), outcome
    assert step in str(outcome["error"]) or "echo hello" in str(outcome["error"])
    assert not session.is_connected  # a connection past its deadline is not reused
    session.reconnect()  # the next step gets a new connection
    try:
        assert session.run("echo again")[:2] == (0, "again\n")
    finally:
        session.close()


def test_a_command_past_its_deadline_raises_timeout_error(sshd, tmp_path):
    session = _session(sshd, tmp_path / "known_hosts")
    session.connect()
    try:
        with pytest.raises(TimeoutError, match="sleep 30"):
            session.run("sleep 30", timeout=1)
    finally:
        session.close()


def test_a_peer_that_accepts_and_stays_silent_fails_connect_at_its_deadline(
        tmp_path, short_deadlines):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        session = RemoteSession("127.0.0.1", "nobody", str(tmp_path / "key"), port,
                                known_hosts=tmp_path / "known_hosts")
        thread, outcome = _in_thread(lambda: session.connect(ready_timeout=0))
        assert not thread.is_alive(), "connect still blocked after 30 s on a silent peer"
    assert isinstance(outcome.get("error"), TimeoutError), outcome
