"""``ramp-runner logs --follow`` on a run on an EC2 instance (moto for EC2, a real sshd on
127.0.0.1 as the instance): the AWS worker's poll (heartbeat and spot check included)
brings the log's new bytes as the SSH worker's does."""

from __future__ import annotations

import threading

from runner.config import load_event_config
from runner.dispatcher import Dispatcher
from tests.chatty import FIRST_LINE, LAST_LINE, NAME, add_chatty, follow, wait_until_training
from tests.events import make_event
from tests.sshd import aws_worker_section, live_instances, remote_dispatcher


def test_follow_a_run_on_an_ec2_instance(tmp_path, sshd, remote_kit, instance_at_sshd):
    path = make_event(tmp_path / "event", (), worker=aws_worker_section(sshd, remote_kit),
                      dispatcher=remote_dispatcher(time_between_collection=0.5))
    add_chatty(path)
    config = load_event_config(path)
    # In this process, where moto's EC2 answers with the sshd's address.
    dispatcher = threading.Thread(target=Dispatcher(config).run, daemon=True)
    dispatcher.start()
    wait_until_training(config.ledger_path, dispatcher.is_alive)
    followed = follow(path, config.ledger_path)
    dispatcher.join(120)
    assert not dispatcher.is_alive()
    assert followed.returncode == 0, followed.stderr
    assert followed.state_at_first_line == "training"
    assert any(FIRST_LINE in line for line in followed.lines)
    assert any(LAST_LINE in line for line in followed.lines)
    assert b"\x1b" not in followed.raw
    assert followed.lines[-1] == f"{NAME}: scored"
    assert live_instances(instance_at_sshd) == []
