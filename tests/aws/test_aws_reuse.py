"""reuse_instances: warm instances between runs of one dispatcher. moto for EC2, the real
sshd on 127.0.0.1 as every instance, real ramp-test in the real sandbox."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from runner.aws import ec2, pool
from runner.aws.worker import AWSWorker
from runner.config import load_event_config
from runner.dispatcher import Dispatcher
from runner.errors import ConfigError
from runner.ledger import Ledger
from tests.events import make_event
from tests.sshd import (
    FAULTS,
    all_instances,
    aws_worker_section,
    inject_fault,
    live_instances,
    remote_dispatcher,
)


def _event(tmp_path, sshd, remote_kit, submissions, reuse, **worker):
    path = make_event(tmp_path / "event", submissions,
                      worker=aws_worker_section(sshd, remote_kit, reuse_instances=reuse,
                                                **worker),
                      dispatcher=remote_dispatcher())
    return load_event_config(path)


def _tags(client, instance_id):
    instance = client.describe_instances(InstanceIds=[instance_id])["Reservations"][0][
        "Instances"][0]
    return {tag["Key"]: tag["Value"] for tag in instance["Tags"]}


def _run_files(remote_kit, name):
    return [remote_kit / "submissions" / name, remote_kit / ".ramp-runner" / name]


def test_two_submissions_in_turn_share_one_instance_wiped_between_them(
        tmp_path, sshd, remote_kit, instance_at_sshd):
    config = _event(tmp_path, sshd, remote_kit, ("starting_kit", "random_forest"),
                    {"max_runs": 3, "idle_minutes": 1})
    worker_dict = config.worker_dict(dispatcher_id="reuse-two")
    first = AWSWorker(worker_dict, "starting_kit")
    assert first.launch() == (0, "")
    instance_id = first.usage.instance_id
    # Warm, and nothing of the first submission left on it.
    assert pool.waiting("reuse-two") == [instance_id]
    assert [i["InstanceId"] for i in live_instances(instance_at_sshd)] == [instance_id]
    assert not any(path.exists() for path in _run_files(remote_kit, "starting_kit"))
    deadline_before = _tags(instance_at_sshd, instance_id)[ec2.TAG_DEADLINE]

    time.sleep(1.1)  # the deadline tag has a one-second resolution
    second = AWSWorker(worker_dict, "random_forest")
    second.setup()
    try:
        assert second.instance.instance_id == instance_id
        assert pool.waiting("reuse-two") == []
        moved = _tags(instance_at_sshd, instance_id)
        assert ec2.parse_deadline(moved[ec2.TAG_DEADLINE]) > ec2.parse_deadline(deadline_before)
        assert moved[ec2.TAG_SUBMISSION] == "random_forest"
        assert moved["Name"].endswith(" random_forest")
        second.launch_submission()
        while second.status == "running":
            second.wait(1)
        assert second.collect_results() == (0, "")
    finally:
        second.kill()
        second.teardown()
    assert len(all_instances(instance_at_sshd)) == 1  # one RunInstances for both
    # Shares of one instance: the first from its launch, the second from the first's end.
    assert second.usage.instance_id == instance_id
    assert second.usage.launched_at == first.usage.ended_at
    assert first.usage.seconds >= 60 and 0 < second.usage.seconds < 60

    assert AWSWorker.close_shared(worker_dict) is None
    assert live_instances(instance_at_sshd) == []
    assert pool.waiting("reuse-two") == []


def test_an_instance_serves_max_runs_and_the_dispatchers_shutdown_ends_the_last(
        tmp_path, sshd, remote_kit, instance_at_sshd):
    names = ("starting_kit", "random_forest", "gradient_boosting")
    config = _event(tmp_path, sshd, remote_kit, names, {"max_runs": 2, "idle_minutes": 1})
    Dispatcher(config).run()
    with Ledger(config.ledger_path) as ledger:
        submissions = {s.name: s for s in ledger.all()}
    assert {name: s.state for name, s in submissions.items()} == dict.fromkeys(names, "scored")
    # Two runs on the first instance, then a new one (in the order the queue gives them);
    # the third run's instance was warm
    # when the event ran out of submissions, and the shutdown terminated it.
    ids = [submissions[name].instance_id for name in names]
    assert len(all_instances(instance_at_sshd)) == 2
    assert sorted(Counter(ids).values()) == [1, 2]
    assert live_instances(instance_at_sshd) == []
    assert all(submissions[name].instance_seconds > 0 for name in names)


def test_an_idle_instance_is_terminated_after_idle_minutes(tmp_path, sshd, remote_kit,
                                                           instance_at_sshd):
    config = _event(tmp_path, sshd, remote_kit, ("starting_kit",),
                    {"max_runs": 5, "idle_minutes": 0.05})  # 3 s
    worker = AWSWorker(config.worker_dict(dispatcher_id="reuse-idle"), "starting_kit")
    assert worker.launch() == (0, "")
    assert len(live_instances(instance_at_sshd)) == 1
    deadline = time.monotonic() + 20
    while live_instances(instance_at_sshd) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert live_instances(instance_at_sshd) == []
    assert pool.waiting("reuse-idle") == []


def test_a_timed_out_run_ends_its_instance(tmp_path, sshd, remote_kit, instance_at_sshd):
    config = _event(tmp_path, sshd, remote_kit, ("hanging",),
                    {"max_runs": 5, "idle_minutes": 1}, timeout=4)
    worker = AWSWorker(config.worker_dict(dispatcher_id="reuse-timeout"), "hanging")
    returncode, _ = worker.launch()
    assert returncode != 0
    assert pool.waiting("reuse-timeout") == []
    assert live_instances(instance_at_sshd) == []


@pytest.mark.parametrize("fault", FAULTS)
def test_a_run_whose_connection_or_collection_failed_ends_its_instance(
        tmp_path, sshd, remote_kit, instance_at_sshd, monkeypatch, fault):
    inject_fault(monkeypatch, fault, remote_kit)
    config = _event(tmp_path, sshd, remote_kit, ("starting_kit",),
                    {"max_runs": 5, "idle_minutes": 1})
    worker = AWSWorker(config.worker_dict(dispatcher_id=f"reuse-{fault}"), "starting_kit")
    if fault == "collect-raises":  # launch() passes the failed collect on
        with pytest.raises(Exception, match="log"):  # noqa: PT011
            worker.launch()
    else:
        assert worker.launch()[0] != 0
    assert worker.known_status == "killed"
    assert pool.waiting(f"reuse-{fault}") == []
    assert len(all_instances(instance_at_sshd)) == 1
    assert live_instances(instance_at_sshd) == []


def test_a_warm_instance_that_ended_meanwhile_is_not_taken(tmp_path, sshd, remote_kit,
                                                           instance_at_sshd):
    config = _event(tmp_path, sshd, remote_kit, ("starting_kit", "random_forest"),
                    {"max_runs": 5, "idle_minutes": 1})
    worker_dict = config.worker_dict(dispatcher_id="reuse-gone")
    first = AWSWorker(worker_dict, "starting_kit")
    assert first.launch() == (0, "")
    # `reap` (or the stack's reaper) terminated it while it waited.
    instance_at_sshd.terminate_instances(InstanceIds=[first.usage.instance_id])
    second = AWSWorker(worker_dict, "random_forest")
    second.setup()
    try:
        assert second.instance.instance_id != first.usage.instance_id
    finally:
        second.kill()
        second.teardown()
    AWSWorker.close_shared(worker_dict)
    assert len(all_instances(instance_at_sshd)) == 2
    assert live_instances(instance_at_sshd) == []


def test_reap_leaves_a_reused_instance_to_its_live_dispatcher(tmp_path, sshd, remote_kit,
                                                               instance_at_sshd):
    config = _event(tmp_path, sshd, remote_kit, ("starting_kit",),
                    {"max_runs": 5, "idle_minutes": 1})
    worker_dict = config.worker_dict(dispatcher_id="reuse-reap")
    worker = AWSWorker(worker_dict, "starting_kit")
    worker.setup()
    try:
        instance_id = worker.instance.instance_id
        assert _tags(instance_at_sshd, instance_id)[ec2.TAG_REUSE] == "5"
        # It runs a later submission of its dispatcher: its tag still names the first.
        assert AWSWorker.reap_leftovers(worker_dict, dry_run=True,
                                        claims=lambda: {"reuse-reap": {"later"}}) == []
        # Its dispatcher runs nothing: a leak.
        assert AWSWorker.reap_leftovers(worker_dict, dry_run=True,
                                        claims=lambda: {"reuse-reap": set()}) == [instance_id]
    finally:
        worker.kill()
        worker.teardown()
    assert live_instances(instance_at_sshd) == []


def test_reuse_is_refused_without_the_sandbox_required(tmp_path, sshd, remote_kit):
    with pytest.raises(ConfigError, match=r"worker\.reuse_instances.*sandbox: required"):
        _event(tmp_path / "auto", sshd, remote_kit, ("starting_kit",),
               {"max_runs": 2, "idle_minutes": 1}, sandbox="auto")
    with pytest.raises(ConfigError, match=r"worker\.reuse_instances\.idle_minutes"):
        _event(tmp_path / "long", sshd, remote_kit, ("starting_kit",),
               {"max_runs": 2, "idle_minutes": 10})
    with pytest.raises(ConfigError, match=r"worker\.reuse_instances\.max_runs"):
        _event(tmp_path / "none", sshd, remote_kit, ("starting_kit",), {"max_runs": 0})
