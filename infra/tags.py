"""Tag keys infra writes or reads; the prefix is the one the runner uses on its instances."""

from __future__ import annotations

TAG_PREFIX = "ramp-runner:"
TAG_CHALLENGE = f"{TAG_PREFIX}challenge"
# The dispatcher tags each worker with its event (runner/aws/ec2.py carries the same literal).
TAG_EVENT = f"{TAG_PREFIX}event"
# ... and with the submission it runs now (a reused instance's changes with each run).
TAG_SUBMISSION = f"{TAG_PREFIX}submission"
# ISO-8601 UTC time (2026-12-05T19:30:00Z) past which the stack's reaper terminates the
# instance, whatever its dispatcher does; the dispatcher sets it at launch.
TAG_DEADLINE = f"{TAG_PREFIX}deadline"
# The runner finds the newest AMI of an event by this tag, not by name prefix.
TAG_AMI_BASE_NAME = f"{TAG_PREFIX}ami-base-name"


def challenge_tags(challenge_name: str) -> dict[str, str]:
    """Tags of every resource of the stack, and of every worker."""
    return {TAG_CHALLENGE: challenge_name}
