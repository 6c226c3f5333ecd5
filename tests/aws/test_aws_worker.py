"""AWSWorker: moto for EC2, a real sshd on 127.0.0.1 as every instance, real ramp-test."""

from __future__ import annotations

import http.server
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runner import ramptest
from runner.aws.worker import AWSWorker
from runner.config import load_event_config
from runner.dispatcher import Dispatcher
from runner.ledger import Ledger
from runner.ssh import remote_worker
from tests.events import make_event
from tests.sshd import (
    FAULTS,
    REPO,
    SUBMISSIONS,
    all_instances,
    aws_worker_section,
    dispatch_within,
    free_port,
    inject_fault,
    live_instances,
    remote_dispatcher,
    session_members,
)


def _ledger(config):
    with Ledger(config.ledger_path) as ledger:
        return {submission.name: submission for submission in ledger.all()}


def test_aws_event_scores_like_the_local_worker(tmp_path, sshd, remote_kit, instance_at_sshd,
                                                fake_conda):
    path = make_event(tmp_path / "aws" / "event", SUBMISSIONS,
                      worker=aws_worker_section(sshd, remote_kit, timeout=15),
                      dispatcher=remote_dispatcher(n_workers=2))
    config = load_event_config(path)
    Dispatcher(config).run()
    remote = _ledger(config)

    # The local reference needs no hanging run: its timeout is checked on the remote side.
    finishing = tuple(name for name in SUBMISSIONS if name != "hanging")
    local_path = make_event(tmp_path / "local", submissions=finishing,
                            worker={"timeout": 15})
    local_config = load_event_config(local_path)
    Dispatcher(local_config).run()
    local = _ledger(local_config)

    assert {name: s.state for name, s in remote.items()} == {
        "starting_kit": "scored", "random_forest": "scored", "gradient_boosting": "scored",
        "raising_error": "training_error", "hanging": "training_error"}
    assert {name: s.state for name, s in local.items()} == {
        name: remote[name].state for name in finishing}
    for name in ("starting_kit", "random_forest", "gradient_boosting"):
        assert remote[name].scores == local[name].scores, name
        assert remote[name].peak_memory_mb > 0
        assert (Path(config.worker.predictions_dir) / name / "bagged_scores.csv").exists()
    assert remote["hanging"].error_msg == ramptest.timeout_message(15)
    assert "RuntimeError" in remote["raising_error"].error_msg
    for name in SUBMISSIONS:
        assert (Path(config.worker.logs_dir) / name / "log").stat().st_size > 0
    instances = all_instances(instance_at_sshd)
    assert len(instances) == len(SUBMISSIONS)
    assert live_instances(instance_at_sshd) == []
    tagged = {t["Value"] for i in instances for t in i["Tags"] if t["Key"] ==
              "ramp-runner:submission"}
    assert tagged == set(SUBMISSIONS)


def test_ssh_never_up_terminates_and_retries_then_checking_error(
        tmp_path, sshd, remote_kit, instance_at_sshd, monkeypatch):
    from runner.aws import ec2

    monkeypatch.setattr(ec2, "instance_address", lambda client, instance_id: ("127.0.0.1", 9))
    path = make_event(tmp_path / "event", ("starting_kit",),
                      worker=aws_worker_section(sshd, remote_kit, ssh_ready_timeout=3),
                      dispatcher=remote_dispatcher(max_attempts=2))
    config = load_event_config(path)
    Dispatcher(config).run()
    submission = _ledger(config)["starting_kit"]
    assert submission.state == "checking_error"
    assert submission.attempts == 2
    assert "did not answer" in submission.error_msg
    assert len(all_instances(instance_at_sshd)) == 2
    assert live_instances(instance_at_sshd) == []


def test_shutdown_during_a_slow_boot_terminates_the_instance_at_once(
        tmp_path, sshd, remote_kit, instance_at_sshd, monkeypatch):
    from runner.aws import ec2

    # An instance whose SSH would take up to ten minutes to answer.
    monkeypatch.setattr(ec2, "instance_address", lambda client, instance_id: ("127.0.0.1", 9))
    path = make_event(tmp_path / "event", ("starting_kit",),
                      worker=aws_worker_section(sshd, remote_kit, ssh_ready_timeout=600),
                      dispatcher=remote_dispatcher())
    config = load_event_config(path)
    dispatcher = Dispatcher(config)
    thread = threading.Thread(target=dispatcher.run)
    thread.start()
    deadline = time.monotonic() + 30
    while not all_instances(instance_at_sshd) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(all_instances(instance_at_sshd)) == 1
    dispatcher.stop()  # what SIGINT/SIGTERM do
    thread.join(30)
    assert not thread.is_alive()
    assert live_instances(instance_at_sshd) == []
    submission = _ledger(config)["starting_kit"]
    assert (submission.state, submission.attempts) == ("new", 0)


def test_timeout_kills_the_remote_tree_and_terminates(tmp_path, sshd, remote_kit,
                                                      instance_at_sshd):
    path = make_event(tmp_path / "event", ("hanging",),
                      worker=aws_worker_section(sshd, remote_kit, timeout=4),
                      dispatcher=remote_dispatcher())
    config = load_event_config(path)
    worker = AWSWorker(config.worker_dict(dispatcher_id="test"), "hanging")
    worker.setup()
    try:
        assert len(live_instances(instance_at_sshd)) == 1
        worker.launch_submission()
        while worker.status == "running":
            worker.wait(1)
        assert worker.status == "timeout"
        sid = int((remote_kit / ".ramp-runner" / "hanging" / "pid").read_text())
        assert session_members(sid)
        returncode, error_msg = worker.collect_results()
        assert session_members(sid) == []
    finally:
        worker.teardown()
    assert (returncode, error_msg) == (ramptest.TIMEOUT_RETURNCODE,
                                       ramptest.timeout_message(4))
    assert live_instances(instance_at_sshd) == []


class _Metadata(http.server.BaseHTTPRequestHandler):
    """IMDSv2 as a spot instance sees it: a token, then the interruption notice."""

    notices = 0
    token = "test-token"

    def do_PUT(self):  # noqa: N802 - http.server's naming
        ok = self.path == "/latest/api/token" and self.headers.get(
            "X-aws-ec2-metadata-token-ttl-seconds")
        self._answer(200 if ok else 400, self.token if ok else "")

    def do_GET(self):  # noqa: N802
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            return self._answer(401, "")
        if self.path == "/latest/meta-data/spot/instance-action" and type(self).notices:
            type(self).notices -= 1
            return self._answer(200, '{"action": "terminate", "time": "2030-01-01T00:00:00Z"}')
        return self._answer(404, "")

    def _answer(self, status, body):
        self.send_response(status)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def metadata(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(remote_worker.RemoteWorker, "metadata_url",
                        f"http://127.0.0.1:{server.server_port}")
    yield _Metadata
    server.shutdown()


def test_spot_notice_retries_on_a_new_instance(tmp_path, sshd, remote_kit, instance_at_sshd,
                                               metadata):
    metadata.notices = 1
    path = make_event(tmp_path / "event", ("starting_kit",),
                      worker=aws_worker_section(sshd, remote_kit, use_spot_instance=True),
                      dispatcher=remote_dispatcher())
    config = load_event_config(path)
    Dispatcher(config).run()
    submission = _ledger(config)["starting_kit"]
    assert submission.state == "scored", submission.error_msg
    assert submission.attempts == 1
    assert metadata.notices == 0
    instances = all_instances(instance_at_sshd)
    assert len(instances) == 2
    assert all(i.get("InstanceLifecycle") == "spot" for i in instances)
    assert live_instances(instance_at_sshd) == []
    # Both instances are paid for: the seconds and cost add up over the two runs,
    # priced from the spot price history (moto's: the same price in every zone).
    [price] = {float(entry["SpotPrice"]) for entry in instance_at_sshd.describe_spot_price_history(
        InstanceTypes=["t3.micro"])["SpotPriceHistory"]}
    assert (submission.market, submission.instance_type) == ("spot", "t3.micro")
    assert submission.instance_id in {i["InstanceId"] for i in instances}
    assert submission.instance_seconds >= 120  # a billed minute at least, each
    assert submission.cost_usd == pytest.approx(submission.instance_seconds * price / 3600)


DISPATCHER = """
import sys
from runner.aws import ec2
ec2.instance_address = lambda client, instance_id: ("127.0.0.1", int(sys.argv[2]))
from runner.config import load_event_config
from runner.dispatcher import Dispatcher
Dispatcher(load_event_config(sys.argv[1])).run()
"""


def test_reap_after_the_dispatcher_was_killed(tmp_path, sshd, remote_kit, instance_at_sshd):
    path = make_event(tmp_path / "event", ("hanging",),
                      worker=aws_worker_section(sshd, remote_kit, timeout=600),
                      dispatcher=remote_dispatcher())
    dispatcher = subprocess.Popen([sys.executable, "-c", DISPATCHER, str(path), str(sshd.port)],
                                  cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid_file = remote_kit / ".ramp-runner" / "hanging" / "pid"
    pid_file.unlink(missing_ok=True)
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text().strip()):
            assert time.monotonic() < deadline and dispatcher.poll() is None
            time.sleep(0.2)
        sid = int(pid_file.read_text())
        os.kill(dispatcher.pid, signal.SIGKILL)
        dispatcher.wait()
        assert len(live_instances(instance_at_sshd)) == 1
        invoke = [str(Path(sys.executable).parent / "invoke"), "-r", str(REPO), "reap",
                  "--event-config", str(path)]
        dry = subprocess.run([*invoke, "--dry-run"], capture_output=True, text=True, cwd=REPO)
        assert dry.returncode == 0, dry.stderr
        assert "would release 1" in dry.stdout
        assert len(live_instances(instance_at_sshd)) == 1
        done = subprocess.run(invoke, capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stderr
        assert "released 1" in done.stdout
        assert live_instances(instance_at_sshd) == []
    finally:
        dispatcher.kill()
        # A real instance dies with its processes; the local "instance" needs a hand.
        if pid_file.exists() and pid_file.read_text().strip():
            left = int(pid_file.read_text())
            deadline = time.monotonic() + 10
            while session_members(left) and time.monotonic() < deadline:
                subprocess.run(["pkill", "-KILL", "-s", str(left)])
                time.sleep(0.1)
    assert session_members(sid) == []


def test_secrets_stay_out_of_logs_reprs_and_the_host(tmp_path, sshd, remote_kit,
                                                     instance_at_sshd, caplog):
    secret = "wJalrXUtnFEMIxK7MDENGxbPxRfiCYzSECRETKEY"
    path = make_event(tmp_path / "event", ("starting_kit",), worker=aws_worker_section(
        sshd, remote_kit, access_key_id="AKIATESTEXPLICIT", secret_access_key=secret),
        dispatcher=remote_dispatcher())
    config = load_event_config(path)
    caplog.set_level(logging.DEBUG)
    Dispatcher(config).run()
    assert _ledger(config)["starting_kit"].state == "scored"
    assert secret not in caplog.text
    assert secret not in repr(config) and secret not in repr(config.worker)
    assert secret not in (Path(config.worker.logs_dir) / "starting_kit" / "log").read_text()
    assert live_instances(instance_at_sshd) == []


@pytest.mark.parametrize("fault", FAULTS)
def test_a_failed_poll_or_collect_leaves_no_instance_running(tmp_path, sshd, remote_kit,
                                                             instance_at_sshd, monkeypatch,
                                                             fault):
    inject_fault(monkeypatch, fault, remote_kit)
    path = make_event(tmp_path / "event", ("starting_kit",),
                      worker=aws_worker_section(sshd, remote_kit),
                      dispatcher=remote_dispatcher(max_attempts=1))
    config = load_event_config(path)
    dispatch_within(config, 120, fault)
    submission = _ledger(config)["starting_kit"]
    # The system's fault: never the participant's training_error.
    assert submission.state == "checking_error", submission.error_msg
    assert len(all_instances(instance_at_sshd)) == 1
    assert live_instances(instance_at_sshd) == []


def test_a_closed_endpoint_at_dispatch_is_one_line_and_launches_nothing(
        tmp_path, sshd, remote_kit, instance_at_sshd):
    path = make_event(tmp_path / "event", ("starting_kit",),
                      worker=aws_worker_section(sshd, remote_kit),
                      dispatcher=remote_dispatcher())
    closed = f"http://127.0.0.1:{free_port()}"
    # The organiser's shell: keys in the environment, EC2's endpoint closed.
    key_id = "AKIACLOSEDENDPOINT01"
    env = {**os.environ, "AWS_ENDPOINT_URL_EC2": closed, "AWS_ACCESS_KEY_ID": key_id}
    completed = subprocess.run([str(Path(sys.executable).parent / "ramp-runner"), "dispatch",
                                "-e", str(path)], capture_output=True, text=True, env=env,
                               timeout=120, check=False, start_new_session=True)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 1, output
    assert "Traceback" not in output and key_id not in output, output
    assert [line for line in output.splitlines() if line.strip()] == [
        f'error: EndpointConnectionError: Could not connect to the endpoint URL: "{closed}/"']
    # Nothing launched at the real endpoint, and no submission touched.
    assert all_instances(instance_at_sshd) == []
    rows = _ledger(load_event_config(path))
    assert all((row.state, row.attempts) == ("new", 0) for row in rows.values()), rows


# The real CLI, with each instance answering at the test's sshd and botocore's retries cut
# to two attempts (the endpoint stays closed: eight would only wait longer).
CLI = """
import sys
from runner.aws import ec2
config, port = sys.argv[1], int(sys.argv[2])
ec2.instance_address = lambda client, instance_id: ("127.0.0.1", port)
ec2.API_MAX_ATTEMPTS = 2
from runner.cli import main
sys.argv = ["ramp-runner", "dispatch", "-e", config]
main()
"""


def test_an_endpoint_closed_mid_run_is_one_line_naming_the_instance_left(
        tmp_path, sshd, remote_kit, instance_at_sshd):
    from moto.server import ThreadedMotoServer

    # A second endpoint of the same moto account: closing it leaves the instances visible.
    port = free_port()
    endpoint = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    endpoint.start()
    path = make_event(tmp_path / "event", ("hanging",),
                      worker=aws_worker_section(sshd, remote_kit, timeout=4),
                      dispatcher=remote_dispatcher())
    config = load_event_config(path)
    dispatcher = subprocess.Popen(
        [sys.executable, "-c", CLI, str(path), str(sshd.port)], cwd=REPO, text=True,
        env={**os.environ, "AWS_ENDPOINT_URL_EC2": f"http://127.0.0.1:{port}"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (config.ledger_path.exists() and _ledger(config).get("hanging")
                   and _ledger(config)["hanging"].state == "training"):
            assert time.monotonic() < deadline and dispatcher.poll() is None, \
                dispatcher.communicate()
            time.sleep(0.2)
        endpoint.stop()
        _, stderr = dispatcher.communicate(timeout=120)
    finally:
        dispatcher.kill()
        left = live_instances(instance_at_sshd)
        if left:
            instance_at_sshd.terminate_instances(InstanceIds=[i["InstanceId"] for i in left])
    # The submission's own outcome stands; the cloud's fault is said once, in one line.
    assert (_ledger(config)["hanging"].state, dispatcher.returncode) == ("training_error", 0)
    assert "Traceback" not in stderr, stderr
    [instance] = left
    said = [line for line in stderr.splitlines() if instance["InstanceId"] in line]
    assert len(said) == 1, stderr
    assert "could not terminate" in said[0] and "invoke reap" in said[0]
