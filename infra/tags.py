"""Tag keys infra writes; the prefix is the one the runner uses on its instances."""

from __future__ import annotations

TAG_PREFIX = "ramp-runner:"
TAG_CHALLENGE = f"{TAG_PREFIX}challenge"
# The runner finds the newest AMI of an event by this tag, not by name prefix.
TAG_AMI_BASE_NAME = f"{TAG_PREFIX}ami-base-name"


def challenge_tags(challenge_name: str) -> dict[str, str]:
    """Tags of every resource of the stack."""
    return {TAG_CHALLENGE: challenge_name}
