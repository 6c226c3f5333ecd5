"""The EC2 side of an AWS run (boto3 only): newest AMI, launch, wait, terminate, reap.

Instances carry tags naming the event, the submission and the dispatcher that launched
them, so that a dispatcher that died can have its instances found and terminated later,
and a deadline (``ramp-runner:deadline``) past which the stack's reaper terminates them
whatever the dispatcher does. They start from the stack's launch template when the event
names one (IMDSv2 only, encrypted root volume, terminate on halt); without one the
request itself asks for IMDSv2 and an encrypted root volume.
Throttling and 5xx answers are retried by botocore's ``standard`` retry mode, except a
spot launch's capacity errors, which fall back to on-demand at once.

The EC2 API is eventually consistent: right after RunInstances, DescribeInstances and
TerminateInstances may answer ``InvalidInstanceID.NotFound`` for an instance that exists
and runs ("Eventual consistency in the Amazon EC2 API",
https://docs.aws.amazon.com/ec2/latest/devguide/eventual-consistency.html). So NotFound
is "not yet", never "gone": the wait for ``running`` applies the acceptors of botocore's
own ``instance_running`` waiter (which retries on NotFound), and a termination counts
only once DescribeInstances shows it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import boto3
import botocore.config
from botocore.exceptions import ClientError

from runner.errors import EventError, InfrastructureError

logger = logging.getLogger("runner.ec2")

# Cloud defaults, in one place.
API_MAX_ATTEMPTS = 8  # botocore standard mode: exponential backoff with jitter, capped at 20 s
RUNNING_POLL_SECONDS = 2.0
RUNNING_TIMEOUT = 600.0
# How long an instance we launched may stay unknown to TerminateInstances/DescribeInstances;
# AWS advises backing off "up to a few minutes".
CONSISTENCY_TIMEOUT = 300.0
SSH_PORT = 22
TAG_EVENT = "ramp-runner:event"
TAG_SUBMISSION = "ramp-runner:submission"
TAG_DISPATCHER = "ramp-runner:dispatcher"
TAG_OWNER = "ramp-runner:owner"
# Read by the stack's reaper (infra/tags.py and infra/reaper_lambda.py carry the same
# literal and format): an ISO-8601 UTC time past which the instance is terminated.
TAG_DEADLINE = "ramp-runner:deadline"
# The stack's workers' tag (stack output workerTags): its dispatcher policy and reaper ask for it.
TAG_CHALLENGE = "ramp-runner:challenge"
# On an instance that may serve several submissions (reuse_instances): its max_runs. Its
# submission tag stays the first one's (the dispatcher policy lets only the deadline move).
TAG_REUSE = "ramp-runner:reuse"
DEADLINE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
# Instance metadata through session tokens only (IMDSv2), one hop: a process on the
# instance reaches it, a container or a forwarded socket does not.
IMDSV2 = {"HttpEndpoint": "enabled", "HttpTokens": "required", "HttpPutResponseHopLimit": 1}
# Written on each AMI by the stack's distribution (infra/tags.py carries the same literal).
TAG_AMI_BASE_NAME = "ramp-runner:ami-base-name"
# The key infra wrote before issue 12: AMIs built then are still found.
TAG_AMI_BASE_NAME_BEFORE = "ramp:ami-base-name"
LIVE_STATES = ("pending", "running", "stopping", "stopped")
ENDED_STATES = ("shutting-down", "terminated")
NOT_FOUND = "InvalidInstanceID.NotFound"

# Answers that mean "no spot capacity for you now", not "your request is wrong".
CAPACITY_ERRORS = frozenset({
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "InsufficientHostCapacity",
    "InsufficientReservedInstanceCapacity",
    "SpotMaxPriceTooLow",
    "MaxSpotInstanceCountExceeded",
    "InsufficientFreeAddressesInSubnet",
    "UnfulfillableCapacity",
    "Unsupported",
})


class AMINotFoundError(EventError):
    """No available AMI of ours matches the configured base name (a configuration problem)."""


@dataclass(frozen=True)
class Instance:
    """A launched instance: its id, whether it runs on the spot market, its type and when
    it was asked for (seconds since the epoch, just before RunInstances)."""

    instance_id: str
    spot: bool
    instance_type: str = ""
    launched_at: float = 0.0

    @property
    def market(self) -> str:
        """``spot`` or ``on-demand``."""
        return "spot" if self.spot else "on-demand"


def deadline_tag(at: float) -> str:
    """``at`` (seconds since the epoch) as the deadline tag's value, e.g. 2026-12-05T19:30:00Z."""
    return datetime.fromtimestamp(at, UTC).strftime(DEADLINE_FORMAT)


def parse_deadline(value: str | None) -> float | None:
    """The deadline tag as seconds since the epoch (a time without offset is UTC, as the
    reaper reads it); None when absent or not ISO-8601."""
    try:
        deadline = datetime.fromisoformat(value or "")
    except ValueError:
        return None
    return (deadline if deadline.tzinfo else deadline.replace(tzinfo=UTC)).timestamp()


def client(region_name: str, profile_name: str | None = None,
           access_key_id: str | None = None, secret_access_key: str | None = None) -> Any:
    """Return an EC2 client: explicit keys if given (seed compatibility), else the
    profile / environment / instance-role chain. ``AWS_ENDPOINT_URL_EC2`` is honoured."""
    session = boto3.Session(
        profile_name=profile_name,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        region_name=region_name,
    )
    retries = {"mode": "standard", "total_max_attempts": API_MAX_ATTEMPTS}
    ec2 = session.client("ec2", config=botocore.config.Config(retries=retries))
    # Registered first, on the operation's own event, so it is asked before the retry
    # handler of standard mode.
    ec2.meta.events.register_first("needs-retry.ec2.RunInstances", _no_retry_without_capacity)
    return ec2


def _no_retry_without_capacity(response: Any = None, request_dict: Any = None,
                                **_: Any) -> None:
    """End a spot launch that found no capacity at its first answer: EC2 answers
    InsufficientInstanceCapacity with HTTP 500, which standard mode retries with backoff
    (https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html lists it
    among server errors); the on-demand fallback is the better next attempt.

    It raises the answer's ClientError rather than returning False: botocore reads a False
    from ``needs-retry`` as "do not retry" only since 1.43.3, and before as "retry after
    sleeping 0 s", a tight loop of RunInstances that never reaches the fallback. A raise
    ends the call the same way on every version."""
    if response is None or "InstanceMarketOptions.MarketType" not in (
            (request_dict or {}).get("body") or {}):
        return
    parsed = response[1]
    if parsed.get("Error", {}).get("Code") in CAPACITY_ERRORS:
        raise ClientError(parsed, "RunInstances")


def newest_ami(ec2: Any, base_name: str) -> str:
    """Return the id of the newest available AMI owned by this account whose base-name
    tag (``TAG_AMI_BASE_NAME``, or the older ``TAG_AMI_BASE_NAME_BEFORE``) is ``base_name``.

    A tag, not a name prefix: ``iris-ramp-worker-gpu-...`` is not an ``iris-ramp-worker``.
    """
    paginator = ec2.get_paginator("describe_images")
    images = {
        image["ImageId"]: image
        for key in (TAG_AMI_BASE_NAME, TAG_AMI_BASE_NAME_BEFORE)
        for page in paginator.paginate(Owners=["self"], Filters=[
            {"Name": f"tag:{key}", "Values": [base_name]},
            {"Name": "state", "Values": ["available"]},
        ])
        for image in page["Images"]
    }
    if not images:
        raise AMINotFoundError(
            f"no available AMI owned by this account tagged {TAG_AMI_BASE_NAME}={base_name} "
            f"in region {ec2.meta.region_name!r} (build one with `invoke build-ami`, or set "
            "ami_image_id)"
        )
    newest = max(images.values(), key=lambda image: image["CreationDate"])
    logger.info("newest AMI for %r: %s (%s, %s)", base_name, newest["ImageId"],
                newest["Name"], newest["CreationDate"])
    return newest["ImageId"]


def pinned_ami(ec2: Any, image_id: str) -> str:
    """Return ``image_id`` once checked to exist and be available in the region."""
    try:
        images = ec2.describe_images(ImageIds=[image_id])["Images"]
    except ClientError as error:
        if error.response["Error"]["Code"].startswith("InvalidAMIID"):
            images = []
        else:
            raise
    if not images or images[0].get("State") != "available":
        raise AMINotFoundError(
            f"AMI {image_id!r} is not available in region {ec2.meta.region_name!r}"
        )
    return image_id


def self_destruct_user_data(seconds: float) -> str:
    """A boot script that halts the machine ``seconds`` after boot; with the shutdown
    behaviour ``terminate`` the instance ends even if its dispatcher died."""
    minutes = max(1, math.ceil(seconds / 60))
    return f"#!/bin/sh\nshutdown -h +{minutes} 'ramp-runner self-destruct'\n"


def encrypted_root(ec2: Any, image_id: str) -> dict[str, Any]:
    """A block device mapping that replaces the AMI's root volume (same device, same size)
    with an encrypted one, encrypted with the account's default key even when the AMI's
    snapshot is not."""
    image = ec2.describe_images(ImageIds=[image_id])["Images"][0]
    device = image.get("RootDeviceName") or "/dev/sda1"
    ebs: dict[str, Any] = {"Encrypted": True, "DeleteOnTermination": True, "VolumeType": "gp3"}
    size = next((m.get("Ebs", {}).get("VolumeSize") for m in image.get("BlockDeviceMappings", [])
                 if m.get("DeviceName") == device), None)
    if size:
        ebs["VolumeSize"] = size
    return {"DeviceName": device, "Ebs": ebs}


def launch_instance(ec2: Any, *, image_id: str, instance_type: str, key_name: str,
                    security_group: str, tags: dict[str, str], spot: bool,
                    spot_fallback_on_demand: bool = True, user_data: str = "",
                    launch_template_id: str | None = None) -> Instance:
    """Launch one instance (spot if asked; on-demand again when spot has no capacity).

    With ``launch_template_id`` the template gives the key pair, the security group, the
    encrypted root volume and the shutdown behaviour (the dispatcher policy of the stack
    allows no launch without it); otherwise the request gives them, the root volume of the
    AMI encrypted. IMDSv2 is asked for either way."""
    tag_list = [{"Key": key, "Value": value} for key, value in tags.items()]
    request: dict[str, Any] = {
        "ImageId": image_id,
        "InstanceType": instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "MetadataOptions": IMDSV2,
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": tag_list},
            {"ResourceType": "volume", "Tags": tag_list},
        ],
        "UserData": user_data,
    }
    if launch_template_id:
        request["LaunchTemplate"] = {"LaunchTemplateId": launch_template_id,
                                     "Version": "$Default"}
    else:
        group_key = "SecurityGroupIds" if security_group.startswith("sg-") else "SecurityGroups"
        request.update({
            "KeyName": key_name,
            group_key: [security_group],
            "InstanceInitiatedShutdownBehavior": "terminate",
            "BlockDeviceMappings": [encrypted_root(ec2, image_id)],
        })
    if spot:
        spot_request = {
            **request,
            # A spot instance cannot be stopped on shutdown: both behaviours say terminate.
            "InstanceMarketOptions": {
                "MarketType": "spot",
                "SpotOptions": {
                    "SpotInstanceType": "one-time",
                    "InstanceInterruptionBehavior": "terminate",
                },
            },
        }
        try:
            started = time.time()
            return Instance(_run_one(ec2, spot_request), True, instance_type, started)
        except ClientError as error:
            code = error.response["Error"]["Code"]
            if code not in CAPACITY_ERRORS or not spot_fallback_on_demand:
                raise
            logger.warning("no spot capacity for %s (%s): launching on-demand instead",
                           instance_type, code)
    started = time.time()
    return Instance(_run_one(ec2, request), False, instance_type, started)


def _run_one(ec2: Any, request: dict[str, Any]) -> str:
    instance_id = ec2.run_instances(**request)["Instances"][0]["InstanceId"]
    logger.info("launched %s (%s)", instance_id,
                "spot" if "InstanceMarketOptions" in request else "on-demand")
    return instance_id


def wait_until_running(ec2: Any, instance_id: str, timeout: float = RUNNING_TIMEOUT,
                       stop: threading.Event | None = None) -> None:
    """Block until the instance is ``running``; raise if it ends, ``timeout`` passes, or
    ``stop`` is set (InterruptedError).

    Each answer is judged by the acceptors of botocore's ``instance_running`` waiter
    (success: running; failure: shutting-down, terminated, stopping; retry:
    InvalidInstanceID.NotFound); the waiter itself is not called because its sleep
    cannot be cut short by ``stop``.
    """
    stop = stop or threading.Event()
    acceptors = ec2.get_waiter("instance_running").config.acceptors
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = ec2.describe_instances(InstanceIds=[instance_id])
        except ClientError as error:
            response = error.response
        verdict = next((a.state for a in acceptors if a.matcher_func(response)), None)
        if verdict == "success":
            return
        state = _state_in(response)
        if verdict == "failure":
            raise RuntimeError(f"instance {instance_id} is {state} before it ran")
        if verdict is None and "Error" in response:
            raise ClientError(response, "DescribeInstances")
        if time.monotonic() > deadline:
            raise TimeoutError(f"instance {instance_id} still {state or 'unknown to EC2'} "
                               f"after {timeout:g} s")
        if stop.wait(RUNNING_POLL_SECONDS):
            raise InterruptedError(f"stopped while instance {instance_id} was {state}")


def _state_in(response: dict[str, Any]) -> str | None:
    reservations = response.get("Reservations") or [{}]
    instances = reservations[0].get("Instances") or [{}]
    return instances[0].get("State", {}).get("Name")


def instance_state(ec2: Any, instance_id: str) -> str | None:
    """Return the state name of an instance, or None while EC2 does not know the id
    (just launched, eventual consistency: not a proof that it is gone)."""
    try:
        return _state_in(ec2.describe_instances(InstanceIds=[instance_id]))
    except ClientError as error:
        if error.response["Error"]["Code"] == NOT_FOUND:
            return None
        raise


def instance_address(ec2: Any, instance_id: str) -> tuple[str, int]:
    """Return the (host, port) to SSH to: public IP, else private IP (same VPC)."""
    reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    instance = reservations[0]["Instances"][0]
    host = instance.get("PublicIpAddress") or instance.get("PrivateIpAddress")
    if not host:
        raise RuntimeError(f"instance {instance_id} has no IP address")
    return host, SSH_PORT


def tag(ec2: Any, instance_id: str, tags: dict[str, str]) -> None:
    """Set ``tags`` on an instance (a reused one: its submission and deadline)."""
    ec2.create_tags(Resources=[instance_id],
                    Tags=[{"Key": key, "Value": value} for key, value in tags.items()])


def terminate(ec2: Any, instance_ids: Iterable[str]) -> None:
    """Terminate instances and see DescribeInstances confirm it (already-ended ones are
    fine); raise InfrastructureError for one still unconfirmed after CONSISTENCY_TIMEOUT."""
    for instance_id in instance_ids:
        _terminate_one(ec2, instance_id)


def _terminate_one(ec2: Any, instance_id: str) -> None:
    # NotFound from TerminateInstances "does not mean the instance was or will be
    # terminated": the AWS guide asks for DescribeInstances, with backoff, to confirm.
    deadline = time.monotonic() + CONSISTENCY_TIMEOUT
    delay = RUNNING_POLL_SECONDS
    while True:
        try:
            ec2.terminate_instances(InstanceIds=[instance_id])
        except ClientError as error:
            if error.response["Error"]["Code"] != NOT_FOUND:
                raise
        state = instance_state(ec2, instance_id)
        if state in ENDED_STATES:
            logger.info("terminated %s", instance_id)
            return
        if time.monotonic() + delay > deadline:
            raise InfrastructureError(
                f"could not confirm the termination of instance {instance_id} within "
                f"{CONSISTENCY_TIMEOUT:g} s (last seen {state or 'unknown to EC2'}); "
                "`invoke reap` terminates it later, its self-destruct timer at the latest"
            )
        logger.info("instance %s is %s after TerminateInstances: asking again in %g s",
                    instance_id, state or "unknown to EC2", delay)
        time.sleep(delay)
        delay = min(delay * 2, 30.0)


def event_instances(ec2: Any, event_name: str) -> list[dict[str, Any]]:
    """Return the live instances tagged with this event, each as {'id', 'tags', 'state'}."""
    pages = ec2.get_paginator("describe_instances").paginate(Filters=[
        {"Name": f"tag:{TAG_EVENT}", "Values": [event_name]},
        {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
    ])
    return [
        {
            "id": instance["InstanceId"],
            "state": instance["State"]["Name"],
            "tags": {tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])},
        }
        for page in pages
        for reservation in page["Reservations"]
        for instance in reservation["Instances"]
    ]


def reap(ec2: Any, event_name: str, is_owned: Callable[[dict[str, str]], bool],
         dry_run: bool = False) -> list[str]:
    """Terminate this event's instances for which ``is_owned(tags)`` is false; return their ids."""
    orphans = [item["id"] for item in event_instances(ec2, event_name)
               if not is_owned(item["tags"])]
    if orphans and not dry_run:
        terminate(ec2, orphans)
    return orphans

