"""The reaper's Lambda handler: terminate this challenge's workers whose deadline has passed.

Runs every few minutes from the stack's schedule, independent of any dispatcher, so an
instance the dispatcher lost (its host died, an endpoint failed, a launch reply was lost)
lives at most a few minutes past its `ramp-runner:deadline` tag. Deployed as this one file:
it imports nothing from infra/, and gets the tag keys and the challenge from its environment.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from typing import Any

import boto3

logger = logging.getLogger("ramp-runner.reaper")
logger.setLevel(logging.INFO)

# Stopped instances cost their volumes; shutting-down and terminated ones are gone.
LIVE_STATES = ["pending", "running", "stopping", "stopped"]


def parse_deadline(value: str) -> datetime | None:
    """The deadline tag as an aware UTC time; None when it is not ISO-8601."""
    try:
        deadline = datetime.fromisoformat(value)
    except ValueError:
        return None
    # The contract says UTC; a time written without its offset is read as UTC too.
    return deadline if deadline.tzinfo else deadline.replace(tzinfo=UTC)


def expired_instances(
    ec2: Any, challenge_tag: str, challenge: str, deadline_tag: str, now: datetime
) -> list[str]:
    """Ids of the challenge's live instances whose deadline tag is at or before `now`."""
    expired = []
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[
            {"Name": f"tag:{challenge_tag}", "Values": [challenge]},
            {"Name": "tag-key", "Values": [deadline_tag]},
            {"Name": "instance-state-name", "Values": LIVE_STATES},
        ]
    )
    for page in pages:
        for reservation in page["Reservations"]:
            for instance in reservation["Instances"]:
                tags = {tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])}
                deadline = parse_deadline(tags[deadline_tag])
                if deadline is None:
                    # Left to the instance's heartbeat timer: a malformed tag is a
                    # dispatcher bug, and terminating a live run for it would be worse.
                    logger.warning(
                        "%s: unreadable %s %r", instance["InstanceId"], deadline_tag,
                        tags[deadline_tag],
                    )
                elif deadline <= now:
                    expired.append(instance["InstanceId"])
    return expired


def reap(ec2: Any, environment: dict[str, str], now: datetime) -> list[str]:
    """Terminate the expired instances named by the environment's tags; return their ids."""
    expired = expired_instances(
        ec2,
        environment["CHALLENGE_TAG"],
        environment["CHALLENGE_NAME"],
        environment["DEADLINE_TAG"],
        now,
    )
    if expired:
        ec2.terminate_instances(InstanceIds=expired)
        logger.info("terminated %d instance(s) past their deadline: %s", len(expired),
                    " ".join(expired))
    return expired


def handler(event: dict, context: object) -> dict:
    """Lambda entry point (the schedule's event carries nothing the reaper needs)."""
    terminated = reap(boto3.client("ec2"), dict(os.environ), datetime.now(UTC))
    return {"terminated": terminated}
