"""What an AWS or SSH worker refuses before anything starts: the self-destruct margin, the
private key file (``preflight``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.aws.worker import AWSWorker
from runner.config import load_event_config
from runner.errors import ConfigError
from runner.ssh.worker import SSHWorker
from tests.events import make_event
from tests.sshd import SSHServer, aws_worker_section, remote_dispatcher, ssh_worker_section


def _server(key_path: Path) -> SSHServer:
    """Where a host would be: only the key matters before anything starts."""
    return SSHServer("127.0.0.1", 22, "ubuntu", str(key_path), "")


@pytest.fixture
def key(tmp_path) -> Path:
    path = tmp_path / "keys" / "worker.pem"
    path.parent.mkdir()
    path.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("margin", [0, 300, 599])
def test_self_destruct_margin_below_ten_minutes_is_refused(tmp_path, key, margin):
    path = make_event(tmp_path / "event", worker=aws_worker_section(
        _server(key), tmp_path / "kit", self_destruct_margin=margin),
        dispatcher=remote_dispatcher())
    with pytest.raises(ConfigError) as caught:
        load_event_config(path)
    message = str(caught.value)
    assert str(path) in message and "worker.self_destruct_margin" in message
    assert "600" in message and str(margin) in message


def test_self_destruct_margin_of_ten_minutes_is_accepted(tmp_path, key):
    path = make_event(tmp_path / "event", worker=aws_worker_section(
        _server(key), tmp_path / "kit", self_destruct_margin=600),
        dispatcher=remote_dispatcher())
    assert load_event_config(path).worker.self_destruct_margin == 600


def _aws(tmp_path, key):
    path = make_event(tmp_path / "event", worker=aws_worker_section(_server(key), tmp_path / "kit"),
                      dispatcher=remote_dispatcher())
    return load_event_config(path).worker_dict()


def _ssh(tmp_path, key):
    other = key.parent / "other.pem"
    other.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    other.chmod(0o600)
    section = ssh_worker_section(_server(other), tmp_path / "kit")
    section["hosts"].append({"host": "10.0.0.2", "user": "ubuntu", "key_path": str(key),
                             "remote_ramp_kit_folder": "/srv/kit"})
    return load_event_config(make_event(tmp_path / "event", worker=section,
                                        dispatcher=remote_dispatcher())).worker_dict()


# (worker class, worker dict, the key that names the file checked)
CASES = [pytest.param(AWSWorker, _aws, "worker.key_path", id="aws"),
         pytest.param(SSHWorker, _ssh, "worker.hosts[1].key_path", id="ssh")]


@pytest.mark.parametrize(("worker_class", "make", "key_name"), CASES)
def test_preflight_accepts_a_key_only_its_owner_reads(tmp_path, key, worker_class, make,
                                                      key_name):
    worker_class.preflight(make(tmp_path, key))


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660], ids=oct)
@pytest.mark.parametrize(("worker_class", "make", "key_name"), CASES)
def test_preflight_refuses_a_key_others_can_read(tmp_path, key, worker_class, make, key_name,
                                                 mode):
    config = make(tmp_path, key)
    key.chmod(mode)
    with pytest.raises(ConfigError) as caught:
        worker_class.preflight(config)
    message = str(caught.value)
    assert key_name in message and str(key) in message
    assert "chmod 600" in message and oct(mode)[2:] in message


@pytest.mark.parametrize(("worker_class", "make", "key_name"), CASES)
def test_preflight_refuses_a_missing_key(tmp_path, key, worker_class, make, key_name):
    config = make(tmp_path, key)
    key.unlink()
    with pytest.raises(ConfigError) as caught:
        worker_class.preflight(config)
    assert key_name in str(caught.value) and str(key) in str(caught.value)
    assert "no such file" in str(caught.value).lower()


@pytest.mark.parametrize(("worker_class", "make", "key_name"), CASES)
@pytest.mark.parametrize(("configured", "seconds"), [(None, 30.0), (0.5, 0.5), (120, 120.0)])
def test_remote_workers_poll_every_30_s_unless_configured(tmp_path, key, worker_class, make,
                                                          key_name, configured, seconds):
    # Each poll is an SSH command on the instance while RAMP times the run; RAMP's own
    # documentation advises at least 60 s on AWS.
    config = make(tmp_path, key)
    config["time_between_collection"] = configured
    assert worker_class(config, "starting_kit").poll_seconds == seconds
