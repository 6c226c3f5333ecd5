"""Secrets of the event config are never printed, logged (at any level) or put in an error."""

from __future__ import annotations

import io
import logging
import socket
import subprocess
import sys
from pathlib import Path

import boto3
import botocore.config
import pytest
import yaml

from runner.config import load_event_config
from runner.redaction import RedactSecrets, install_redaction
from tests.events import make_event

SEEDS = Path(__file__).resolve().parent.parent / "seed_configs"
KEY_ID = "AKIAFAULTSUITE7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/fault-suite-secret"


@pytest.fixture
def aws_config_path(tmp_path):
    document = yaml.safe_load((SEEDS / "aws.yml").read_text())
    document["worker"].update(access_key_id=KEY_ID, secret_access_key=SECRET)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_printable_forms_of_the_config_hide_the_secrets(aws_config_path):
    config = load_event_config(aws_config_path)
    shown = "\n".join(f"{key}: {value!r}" for key, value in config.public_items())
    assert "worker.secret_access_key: '<hidden>'" in shown
    assert "worker.access_key_id: '<hidden>'" in shown
    assert "worker.region_name: 'us-west-2'" in shown
    for text in (shown, repr(config), repr(config.worker_dict()), str(config.worker_dict())):
        assert KEY_ID not in text and SECRET not in text
    assert config.secret_values() == {KEY_ID, SECRET}


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _botocore_debug_log(redactor: logging.Filter | None, from_environment=False) -> str:
    """What botocore logs at DEBUG for one call to a closed endpoint on 127.0.0.1, signed
    with KEY_ID and SECRET, or with the credentials of the environment."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    if redactor is not None:
        handler.addFilter(redactor)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        keys = {} if from_environment else {"aws_access_key_id": KEY_ID,
                                            "aws_secret_access_key": SECRET}
        client = boto3.session.Session(**keys, region_name="us-west-2").client("ec2", endpoint_url=f"http://127.0.0.1:{_closed_port()}",
                 config=botocore.config.Config(retries={"max_attempts": 1}, connect_timeout=1))
        try:
            client.describe_instances()
        except Exception:  # noqa: BLE001 - the closed endpoint refuses: logged like a dispatch
            logging.getLogger("runner.dispatcher").exception("the call failed")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return stream.getvalue()


def test_botocore_debug_output_is_redacted(aws_config_path):
    # Without the filter, botocore's debug output carries the access key id (Credential=...).
    assert KEY_ID in _botocore_debug_log(None)

    config = load_event_config(aws_config_path)
    logged = _botocore_debug_log(RedactSecrets(config.secret_values()))
    assert "Credential=<hidden>/" in logged
    assert "EndpointConnectionError" in logged  # the traceback is kept, redacted
    assert KEY_ID not in logged and SECRET not in logged


def test_install_redaction_covers_every_handler_of_the_logger(aws_config_path):
    config = load_event_config(aws_config_path)
    logger = logging.getLogger("tests.faults.redaction")
    logger.propagate = False
    streams = [io.StringIO(), io.StringIO()]
    for stream in streams:
        logger.addHandler(logging.StreamHandler(stream))
    try:
        install_redaction(config, logger)
        logger.warning("key %s and secret %s", KEY_ID, SECRET)
        try:
            raise RuntimeError(f"signed with {SECRET}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.handlers.clear()
    for stream in streams:
        text = stream.getvalue()
        assert "key <hidden> and secret <hidden>" in text and "RuntimeError" in text
        assert KEY_ID not in text and SECRET not in text


def test_check_config_never_prints_the_secrets(tmp_path):
    key = tmp_path / "iris_key.pem"
    key.write_text("not a real key\n")
    key.chmod(0o600)
    path = make_event(tmp_path / "event", ("starting_kit",), worker={
        "worker_type": "aws", "access_key_id": KEY_ID, "secret_access_key": SECRET,
        "region_name": "us-west-2", "ami_image_name": "iris-ramp-worker", "key_name": "iris",
        "key_path": str(key), "ami_user_name": "ubuntu", "instance_type": "t3.micro",
        "security_group": "sg-1",
        "remote_ramp_kit_folder": "/home/ubuntu/ramp-kits/iris"})
    completed = subprocess.run(
        [str(Path(sys.executable).parent / "ramp-runner"), "check-config", "-e", str(path)],
        capture_output=True, text=True, timeout=120, check=False)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert "worker.region_name" in output  # the table was printed
    assert KEY_ID not in output and SECRET not in output


def test_credentials_from_the_environment_are_redacted_in_botocore_debug_output(
        tmp_path, monkeypatch):
    # The organiser's shell holds the keys; the config has none to know them by.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEfault-suite-session-token")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    config = load_event_config(make_event(tmp_path / "event", ("starting_kit",)))
    assert config.secret_values() == set()

    logged = _botocore_debug_log(RedactSecrets(config.secret_values()), from_environment=True)
    assert "Credential=<hidden>/" in logged
    assert "EndpointConnectionError" in logged
    for value in (KEY_ID, SECRET, "fault-suite-session-token"):
        assert value not in logged
