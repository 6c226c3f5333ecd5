"""The reaper's Lambda handler against moto's EC2 mock: only the challenge's workers past
their deadline tag are terminated."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import boto3
import pytest
from moto import mock_aws

from infra import reaper_lambda, tags

REGION = "eu-west-1"
NOW = datetime(2026, 12, 5, 18, 0, tzinfo=UTC)
ENVIRONMENT = {
    "CHALLENGE_TAG": tags.TAG_CHALLENGE,
    "CHALLENGE_NAME": "iris",
    "DEADLINE_TAG": tags.TAG_DEADLINE,
}


@pytest.fixture
def ec2(monkeypatch):
    """An EC2 client on moto's in-process mock, with one AMI to launch from."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(key, value)
    with mock_aws():
        yield boto3.client("ec2", region_name=REGION)


def launch(ec2, **instance_tags: str) -> str:
    """One instance with the given tags; its id."""
    [image] = ec2.describe_images(Owners=["amazon"])["Images"][:1]
    tag_list = [{"Key": k, "Value": v} for k, v in instance_tags.items()]
    reply = ec2.run_instances(
        ImageId=image["ImageId"],
        InstanceType="t3.micro",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": tag_list}],
    )
    return reply["Instances"][0]["InstanceId"]


def state(ec2, instance_id: str) -> str:
    """The instance's state name."""
    [reservation] = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return reservation["Instances"][0]["State"]["Name"]


def worker(ec2, challenge: str, deadline: timedelta | None) -> str:
    """A worker of a challenge whose deadline tag is NOW + deadline, as the dispatcher writes
    it (ISO-8601, UTC, Z); no deadline tag when deadline is None."""
    worker_tags = {tags.TAG_CHALLENGE: challenge}
    if deadline is not None:
        worker_tags[tags.TAG_DEADLINE] = (NOW + deadline).strftime("%Y-%m-%dT%H:%M:%SZ")
    return launch(ec2, **worker_tags)


def test_terminates_only_the_challenges_instances_past_their_deadline(ec2):
    past = worker(ec2, "iris", -timedelta(minutes=1))
    future = worker(ec2, "iris", timedelta(hours=1))
    other = worker(ec2, "titanic", -timedelta(hours=1))
    untagged = worker(ec2, "iris", None)

    assert reaper_lambda.reap(ec2, ENVIRONMENT, NOW) == [past]

    assert state(ec2, past) in ("shutting-down", "terminated")
    for alive in (future, other, untagged):
        assert state(ec2, alive) == "running", alive


def test_an_unreadable_deadline_is_left_to_the_heartbeat_timer(ec2, caplog):
    kept = launch(ec2, **{tags.TAG_CHALLENGE: "iris", tags.TAG_DEADLINE: "tomorrow"})
    assert reaper_lambda.reap(ec2, ENVIRONMENT, NOW) == []
    assert state(ec2, kept) == "running"
    assert "tomorrow" in caplog.text


def test_already_terminated_instances_are_not_terminated_again(ec2):
    gone = worker(ec2, "iris", -timedelta(hours=2))
    ec2.terminate_instances(InstanceIds=[gone])
    assert reaper_lambda.reap(ec2, ENVIRONMENT, NOW) == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-12-05T18:00:00Z", NOW),
        ("2026-12-05T19:00:00+01:00", NOW),
        ("2026-12-05T18:00:00", NOW),
        ("2026-12-05 18:00", NOW),
        ("soon", None),
        ("", None),
    ],
)
def test_parse_deadline(value, expected):
    assert reaper_lambda.parse_deadline(value) == expected


def test_handler_reads_its_environment_and_the_clock(ec2, monkeypatch):
    for key, value in ENVIRONMENT.items():
        monkeypatch.setenv(key, value)
    expired = launch(ec2, **{
        tags.TAG_CHALLENGE: "iris",
        tags.TAG_DEADLINE: (datetime.now(UTC) - timedelta(seconds=5)).isoformat(),
    })
    assert reaper_lambda.handler({}, None) == {"terminated": [expired]}
