"""The EC2 side of an AWS run (boto3 only): newest AMI, launch, wait, terminate, reap.

Instances carry tags naming the event, the submission and the dispatcher that launched
them, so that a dispatcher that died can have its instances found and terminated later.
Throttling and 5xx answers are retried by botocore's ``standard`` retry mode.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import boto3
import botocore.config
from botocore.exceptions import ClientError

from runner.errors import EventError

logger = logging.getLogger("runner.ec2")

# Cloud defaults, in one place.
API_MAX_ATTEMPTS = 8  # botocore standard mode: exponential backoff with jitter, capped at 20 s
RUNNING_POLL_SECONDS = 2.0
RUNNING_TIMEOUT = 600.0
SSH_PORT = 22
TAG_EVENT = "ramp-runner:event"
TAG_SUBMISSION = "ramp-runner:submission"
TAG_DISPATCHER = "ramp-runner:dispatcher"
TAG_OWNER = "ramp-runner:owner"
LIVE_STATES = ("pending", "running", "stopping", "stopped")

# Answers that mean "no spot capacity for you now", not "your request is wrong".
CAPACITY_ERRORS = frozenset({
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "InsufficientHostCapacity",
    "InsufficientReservedInstanceCapacity",
    "SpotMaxPriceTooLow",
    "MaxSpotInstanceCountExceeded",
    "InsufficientFreeAddressesInSubnet",
    "Unsupported",
})


class AMINotFoundError(EventError):
    """No available AMI of ours matches the configured base name (a configuration problem)."""


@dataclass(frozen=True)
class Instance:
    """A launched instance: its id and whether it runs on the spot market."""

    instance_id: str
    spot: bool


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
    retries = {"mode": "standard", "max_attempts": API_MAX_ATTEMPTS}
    return session.client("ec2", config=botocore.config.Config(retries=retries))


def newest_ami(ec2: Any, base_name: str) -> str:
    """Return the id of the newest available AMI owned by this account named ``base_name*``."""
    pages = ec2.get_paginator("describe_images").paginate(
        Owners=["self"],
        Filters=[
            {"Name": "name", "Values": [f"{base_name}*"]},
            {"Name": "state", "Values": ["available"]},
        ],
    )
    images = [image for page in pages for image in page["Images"]
              if image.get("Name", "").startswith(base_name)]
    if not images:
        raise AMINotFoundError(
            f"no available AMI owned by this account whose name starts with {base_name!r} "
            f"in region {ec2.meta.region_name!r}"
        )
    newest = max(images, key=lambda image: image["CreationDate"])
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


def launch_instance(ec2: Any, *, image_id: str, instance_type: str, key_name: str,
                    security_group: str, tags: dict[str, str], spot: bool,
                    spot_fallback_on_demand: bool = True, user_data: str = "") -> Instance:
    """Launch one instance (spot if asked; on-demand again when spot has no capacity)."""
    group_key = "SecurityGroupIds" if security_group.startswith("sg-") else "SecurityGroups"
    tag_list = [{"Key": key, "Value": value} for key, value in tags.items()]
    request = {
        "ImageId": image_id,
        "InstanceType": instance_type,
        "KeyName": key_name,
        group_key: [security_group],
        "MinCount": 1,
        "MaxCount": 1,
        "InstanceInitiatedShutdownBehavior": "terminate",
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": tag_list},
            {"ResourceType": "volume", "Tags": tag_list},
        ],
        "UserData": user_data,
    }
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
            return Instance(_run_one(ec2, spot_request), spot=True)
        except ClientError as error:
            code = error.response["Error"]["Code"]
            if code not in CAPACITY_ERRORS or not spot_fallback_on_demand:
                raise
            logger.warning("no spot capacity for %s (%s): launching on-demand instead",
                           instance_type, code)
    return Instance(_run_one(ec2, request), spot=False)


def _run_one(ec2: Any, request: dict[str, Any]) -> str:
    instance_id = ec2.run_instances(**request)["Instances"][0]["InstanceId"]
    logger.info("launched %s (%s)", instance_id,
                "spot" if "InstanceMarketOptions" in request else "on-demand")
    return instance_id


def wait_until_running(ec2: Any, instance_id: str, timeout: float = RUNNING_TIMEOUT,
                       stop: threading.Event | None = None) -> None:
    """Block until the instance is ``running``; raise if it ends, ``timeout`` passes, or
    ``stop`` is set (InterruptedError)."""
    stop = stop or threading.Event()
    deadline = time.monotonic() + timeout
    while True:
        state = instance_state(ec2, instance_id)
        if state == "running":
            return
        if state in ("shutting-down", "terminated", "stopping", "stopped"):
            raise RuntimeError(f"instance {instance_id} is {state} before it ran")
        if time.monotonic() > deadline:
            raise TimeoutError(f"instance {instance_id} still {state} after {timeout:g} s")
        if stop.wait(RUNNING_POLL_SECONDS):
            raise InterruptedError(f"stopped while instance {instance_id} was {state}")


def instance_state(ec2: Any, instance_id: str) -> str:
    """Return the state name of an instance (``terminated`` once it is gone)."""
    try:
        reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    except ClientError as error:
        if error.response["Error"]["Code"] == "InvalidInstanceID.NotFound":
            return "terminated"
        raise
    return reservations[0]["Instances"][0]["State"]["Name"]


def instance_address(ec2: Any, instance_id: str) -> tuple[str, int]:
    """Return the (host, port) to SSH to: public IP, else private IP (same VPC)."""
    reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    instance = reservations[0]["Instances"][0]
    host = instance.get("PublicIpAddress") or instance.get("PrivateIpAddress")
    if not host:
        raise RuntimeError(f"instance {instance_id} has no IP address")
    return host, SSH_PORT


def terminate(ec2: Any, instance_ids: Iterable[str]) -> None:
    """Terminate instances (already-gone ones are not an error)."""
    instance_ids = list(instance_ids)
    if not instance_ids:
        return
    try:
        ec2.terminate_instances(InstanceIds=instance_ids)
    except ClientError as error:
        if error.response["Error"]["Code"] != "InvalidInstanceID.NotFound":
            raise
    logger.info("terminated %s", ", ".join(instance_ids))


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

