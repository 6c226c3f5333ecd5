"""What an instance cost: its seconds, and an estimated price per hour.

A reused instance (``reuse_instances``) is split into shares, one per submission: from
the launch (the first) or from the end of the previous run (the next ones: the idle wait
before a run is that run's) to the end of its own run. The idle wait after the last run
(at most ``idle_minutes``) is nobody's share and is not in the ledger.

An estimate, not the bill: spot hours at the highest price EC2's spot price history gives
for the instance's type and zone over its life (the price it was billed moves within that),
on-demand hours at the event's ``prices`` table (the Pricing API is another service and
another permission). EC2 bills Linux instances per second with a one-minute minimum.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

logger = logging.getLogger("runner.ec2")

MINIMUM_BILLED_SECONDS = 60.0
SPOT_PRODUCT = "Linux/UNIX"


@dataclass(frozen=True)
class InstanceUsage:
    """One instance a submission ran on, from launch to termination."""

    instance_id: str
    instance_type: str
    market: str
    launched_at: float
    ended_at: float
    usd_per_hour: float | None
    # EC2's one-minute minimum is billed once per instance: a later share of a reused
    # instance (runner.aws.pool) has none.
    minimum_seconds: float = MINIMUM_BILLED_SECONDS

    @property
    def seconds(self) -> float:
        """Instance-seconds, as billed (at least a minute for an instance's first share)."""
        return max(self.minimum_seconds, self.ended_at - self.launched_at)

    @property
    def cost_usd(self) -> float | None:
        """The estimated cost, or None without a price."""
        return None if self.usd_per_hour is None else self.seconds * self.usd_per_hour / 3600


def spot_price(ec2: Any, instance_id: str, instance_type: str, since: float,
               until: float) -> float | None:
    """The highest spot price of ``instance_type`` in the instance's zone between ``since``
    and ``until``, or None when EC2 gives none (or cannot be asked)."""
    try:
        reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        zone = reservations[0]["Instances"][0]["Placement"]["AvailabilityZone"]
        pages = ec2.get_paginator("describe_spot_price_history").paginate(
            InstanceTypes=[instance_type], ProductDescriptions=[SPOT_PRODUCT],
            AvailabilityZone=zone, StartTime=datetime.fromtimestamp(since, UTC),
            EndTime=datetime.fromtimestamp(until, UTC))
        prices = [float(entry["SpotPrice"]) for page in pages
                  for entry in page["SpotPriceHistory"]
                  if entry.get("AvailabilityZone", zone) == zone]
    except (BotoCoreError, ClientError, LookupError, ValueError) as error:
        logger.warning("no spot price for %s (%s): %s", instance_id, instance_type, error)
        return None
    return max(prices, default=None)
