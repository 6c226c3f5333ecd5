"""What AWS runs cost and what bounds them: the launch's tags and template, the cost
columns of the ledger, the event budget, and `reap` of a live dispatcher's leaks. moto for
EC2, the real sshd as every instance, real ramp-test, the real command line."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.aws import ec2
from runner.aws.worker import owner_token
from runner.config import load_event_config
from runner.dispatcher import Dispatcher
from runner.ledger import Ledger
from tests.events import make_event
from tests.sshd import REPO, all_instances, aws_worker_section, live_instances, remote_dispatcher

RAMP_RUNNER = str(Path(sys.executable).parent / "ramp-runner")
# One dollar a second: any run passes a budget of a cent.
DEAR = [{"instance_type": "t3.micro", "usd_per_hour": 3600.0}]


def _rows(config):
    with Ledger(config.ledger_path) as ledger:
        return {row.name: row for row in ledger.all()}


def _tags(instance):
    return {tag["Key"]: tag["Value"] for tag in instance["Tags"]}


def _template(client):
    group = client.describe_security_groups(GroupNames=["ramp-workers"])["SecurityGroups"][0]
    return client.create_launch_template(LaunchTemplateName="iris-ramp-worker",
                                         LaunchTemplateData={
        "KeyName": "iris_key", "SecurityGroupIds": [group["GroupId"]],
        "InstanceInitiatedShutdownBehavior": "terminate",
        "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1},
    })["LaunchTemplate"]["LaunchTemplateId"]


def test_a_run_is_launched_as_the_stack_asks_and_its_cost_is_kept(
        tmp_path, sshd, remote_kit, instance_at_sshd):
    template = _template(instance_at_sshd)
    path = make_event(tmp_path / "event", ("starting_kit",), worker=aws_worker_section(
        sshd, remote_kit, timeout=60, self_destruct_margin=900, launch_template_id=template,
        challenge_name="iris", prices=[{"instance_type": "t3.micro", "usd_per_hour": 0.0104}]),
        dispatcher=remote_dispatcher())
    config = load_event_config(path)
    before = time.time()
    Dispatcher(config).run()
    after = time.time()
    row = _rows(config)["starting_kit"]
    assert row.state == "scored", row.error_msg

    [instance] = all_instances(instance_at_sshd)
    tags = _tags(instance)
    # What the stack's dispatcher policy asks of a launch, and what its reaper reads.
    assert tags["ramp-runner:challenge"] == "iris"
    assert tags["ramp-runner:event"] == config.ramp.event_name
    deadline = ec2.parse_deadline(tags["ramp-runner:deadline"])
    assert before + 60 + 900 - 1 <= deadline <= after + 60 + 900
    assert tags["aws:ec2launchtemplate:id"] == template
    assert instance["MetadataOptions"]["HttpTokens"] == "required"

    # The ledger's cost columns.
    assert (row.instance_id, row.instance_type, row.market) == (
        instance["InstanceId"], "t3.micro", "on-demand")
    assert before <= row.launched_at < row.terminated_at <= after
    assert row.instance_seconds == max(60.0, row.terminated_at - row.launched_at)
    assert row.cost_usd == pytest.approx(row.instance_seconds * 0.0104 / 3600)

    status = subprocess.run([RAMP_RUNNER, "status", "-e", str(path)], capture_output=True,
                            text=True, cwd=REPO, env={**os.environ, "COLUMNS": "200"})
    assert status.returncode == 0, status.stderr
    line = next(x for x in status.stdout.splitlines() if "starting_kit" in x)
    assert "t3.micro on-demand" in line and f"{row.cost_usd:.4f}" in line
    assert f"instances: {row.instance_seconds:.0f} s, {row.cost_usd:.4f} USD" in status.stdout
    detail = subprocess.run([RAMP_RUNNER, "status", "-e", str(path), "--submission",
                             "starting_kit"], capture_output=True, text=True, cwd=REPO)
    assert row.instance_id in detail.stdout and "terminated" in detail.stdout


def test_past_its_budget_the_event_launches_nothing_and_says_so_once(
        tmp_path, sshd, remote_kit, instance_at_sshd, caplog):
    path = make_event(tmp_path / "event", ("starting_kit", "random_forest", "raising_error"),
                      worker=aws_worker_section(sshd, remote_kit, budget_usd=0.01, prices=DEAR),
                      dispatcher=remote_dispatcher())
    config = load_event_config(path)
    caplog.set_level(logging.WARNING, logger="runner.dispatcher")
    Dispatcher(config).run()
    rows = _rows(config)
    ran = [name for name, row in rows.items() if row.instance_id]
    assert len(ran) == 1 and rows[ran[0]].cost_usd >= 60.0
    waiting = [row for name, row in rows.items() if name not in ran]
    assert [(row.state, row.attempts) for row in waiting] == [("new", 0), ("new", 0)]
    assert len(all_instances(instance_at_sshd)) == 1
    said = [r.getMessage() for r in caplog.records
            if r.name == "runner.dispatcher" and "budget" in r.getMessage()]
    assert len(said) == 1 and "0.01" in said[0], said

    # A second dispatch of the spent event starts nothing either.
    Dispatcher(load_event_config(path)).run()
    assert len(all_instances(instance_at_sshd)) == 1

    check = subprocess.run([RAMP_RUNNER, "check-config", "-e", str(path)],
                           capture_output=True, text=True, cwd=REPO)
    assert check.returncode == 0, check.stderr
    spent = rows[ran[0]]
    assert (f"spent: {spent.instance_seconds:.0f} s, {spent.cost_usd:.4f} USD "
            "(budget 0.01 USD)") in check.stdout


def test_a_budget_needs_the_price_of_the_instance_type(tmp_path, sshd, remote_kit):
    from runner.errors import ConfigError

    path = make_event(tmp_path / "event", worker=aws_worker_section(
        sshd, remote_kit, budget_usd=10,
        prices=[{"instance_type": "g5.xlarge", "usd_per_hour": 1.006}]),
        dispatcher=remote_dispatcher())
    with pytest.raises(ConfigError) as caught:
        load_event_config(path)
    assert "worker.prices" in str(caught.value) and "t3.micro" in str(caught.value)


def test_a_budget_is_refused_for_a_ramp_boards_submissions(tmp_path, sshd, remote_kit):
    from runner.errors import ConfigError
    from runner.rampdb import RampSource

    path = make_event(tmp_path / "event", worker=aws_worker_section(
        sshd, remote_kit, budget_usd=10, prices=DEAR), dispatcher=remote_dispatcher())
    config = load_event_config(path)
    board = RampSource(config, {"drivername": "sqlite", "database": str(tmp_path / "board.db")})
    # Their cost is kept in the event's ledger only: the budget could not be enforced.
    with pytest.raises(ConfigError) as caught:
        Dispatcher(config, source=board)
    assert str(path) in str(caught.value) and "worker.budget_usd" in str(caught.value)
    assert not (tmp_path / "board.db").exists()  # refused before anything is opened


def test_aws_runs_require_the_sandbox_unless_the_event_says_otherwise(tmp_path, sshd,
                                                                      remote_kit):
    default = make_event(tmp_path / "default", worker=aws_worker_section(sshd, remote_kit),
                         dispatcher=remote_dispatcher())
    assert load_event_config(default).worker.sandbox == "required"
    chosen = make_event(tmp_path / "chosen", worker=aws_worker_section(
        sshd, remote_kit, sandbox="auto"), dispatcher=remote_dispatcher())
    assert load_event_config(chosen).worker.sandbox == "auto"


def test_reap_ends_a_live_dispatchers_leaks(tmp_path, sshd, remote_kit, instance_at_sshd):
    """Instances of a dispatcher that still runs (this process owns them): one claimed and
    within its deadline stays; one past its deadline, and one whose submission no claim
    accounts for (a run that ended while its termination failed), are terminated. One of a
    dispatcher the ledger does not know (a RAMP board's) stays."""
    path = make_event(tmp_path / "event", ("starting_kit", "random_forest"),
                      worker=aws_worker_section(sshd, remote_kit),
                      dispatcher=remote_dispatcher())
    config = load_event_config(path)
    with Ledger(config.ledger_path) as ledger:
        ledger.add(["starting_kit", "random_forest"])
        assert ledger.claim(1, worker="live-dispatcher") == ["starting_kit"]
    image = instance_at_sshd.describe_images(Owners=["self"])["Images"][0]["ImageId"]
    client = ec2.client("eu-west-3")

    def launch(submission, deadline, dispatcher="live-dispatcher"):
        return ec2.launch_instance(
            client, image_id=image, instance_type="t3.micro", key_name="iris_key",
            security_group="ramp-workers", spot=False, tags={
                ec2.TAG_EVENT: config.ramp.event_name, ec2.TAG_SUBMISSION: submission,
                ec2.TAG_DISPATCHER: dispatcher, ec2.TAG_OWNER: owner_token(),
                ec2.TAG_DEADLINE: ec2.deadline_tag(deadline)}).instance_id

    running = launch("starting_kit", time.time() + 3600)
    expired = launch("starting_kit", time.time() - 1)
    unclaimed = launch("random_forest", time.time() + 3600)
    boards = launch("random_forest", time.time() + 3600, dispatcher="board-dispatcher")
    dry = subprocess.run([RAMP_RUNNER, "reap", "-e", str(path), "--dry-run"],
                         capture_output=True, text=True, cwd=REPO)
    assert dry.returncode == 0, dry.stderr
    assert set(dry.stdout.split(": ", 1)[1].split()) == {expired, unclaimed}
    assert len(live_instances(instance_at_sshd)) == 4
    done = subprocess.run([RAMP_RUNNER, "reap", "-e", str(path)], capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert {i["InstanceId"] for i in live_instances(instance_at_sshd)} == {running, boards}
