"""Start the Image Builder pipeline that bakes the worker AMI and follow the image it makes."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from runner.errors import RunnerError

# Image Builder throttles with its own code; the others are the generic AWS spellings.
RETRYABLE_ERRORS = frozenset(
    {
        "ThrottlingException",
        "CallRateLimitExceededException",
        "TooManyRequestsException",
        "ServiceUnavailableException",
    }
)
IN_PROGRESS = frozenset(
    {"PENDING", "CREATING", "BUILDING", "TESTING", "DISTRIBUTING", "INTEGRATING"}
)

ProgressCallback = Callable[[str, float], None]


class ImageBuildError(RunnerError, RuntimeError):
    """The image ended in a state other than AVAILABLE; carries Image Builder's reason and,
    for a failed image, where it failed (``failure_context``)."""

    def __init__(self, image_arn: str, status: str, reason: str | None,
                 failure_context: str = ""):
        where = f"\n{failure_context}" if failure_context else ""
        super().__init__(f"image {image_arn} {status}: {reason or 'no reason given'}{where}")
        self.image_arn = image_arn
        self.status = status
        self.reason = reason
        self.failure_context = failure_context


def failure_context(image: dict) -> str:
    """Where a failed image failed, from ``state.failureContext`` of GetImage: the stage,
    the workflow step, the component's phase, step and message, or the distribution's;
    and the log group of its build. Empty when Image Builder gives none."""
    context = image.get("state", {}).get("failureContext") or {}
    lines = []
    stage = context.get("imageStatus")
    step = context.get("failedStep")
    if stage or step:
        lines.append("failed " + " ".join(filter(None, (
            f"while {stage}" if stage else "", f"at workflow step {step}" if step else ""))))
    component = context.get("componentFailure") or {}
    if component:
        name = component.get("componentArn", "").split("component/")[-1] or "a component"
        where = "/".join(filter(None, (component.get("phaseName"), component.get("stepName"))))
        action = f" ({component['action']})" if component.get("action") else ""
        lines.append(f"component {name}, step {where or '?'}{action}: "
                     f"{component.get('errorMessage') or 'no message'}")
    distribution = context.get("distributionFailure") or {}
    if distribution:
        lines.append(f"distribution: {distribution.get('errorMessage') or 'no message'}")
        lines += [f"  {region.get('region', '?')}: {region.get('errorMessage', '')}"
                  for region in distribution.get("regionFailures", [])]
    group = (image.get("loggingConfiguration") or {}).get("logGroupName")
    if lines and group:
        lines.append(f"logs: CloudWatch log group {group}")
    return "\n".join(lines)


@dataclass(frozen=True)
class BuiltAmi:
    """The AMI an AVAILABLE image distributed."""

    image_arn: str
    ami_id: str
    ami_name: str
    region: str


def region_of(arn: str) -> str:
    """Region field of an ARN (arn:aws:imagebuilder:REGION:account:...)."""
    parts = arn.split(":")
    if len(parts) < 6 or parts[0] != "arn" or not parts[3]:
        raise ValueError(f"not a regional ARN: {arn!r}")
    return parts[3]


def make_client(pipeline_arn: str, session: boto3.Session | None = None) -> Any:
    """An Image Builder client in the pipeline's region."""
    session = session or boto3.Session()
    return session.client(
        "imagebuilder",
        region_name=region_of(pipeline_arn),
        config=Config(retries={"mode": "standard", "max_attempts": 5}),
    )


def call_with_retries(
    call: Callable[[], dict],
    *,
    attempts: int = 8,
    base_delay: float = 1.0,
    max_delay: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """Run call, backing off (exponential, full jitter) while AWS throttles it."""
    for attempt in range(attempts):
        try:
            return call()
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code")
            if code not in RETRYABLE_ERRORS or attempt == attempts - 1:
                raise
            sleep(random.uniform(0, min(max_delay, base_delay * 2**attempt)))
    raise AssertionError("unreachable")


def start_build(
    client: Any,
    pipeline_arn: str,
    *,
    client_token: str | None = None,
    tags: dict[str, str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Start one pipeline execution; return the image build version ARN.

    The client token is fixed before the first attempt, so a retried request after a
    throttle or a lost response starts no second build. ``tags`` go on the image (the
    stack output ``imageTags``): Image Builder does not copy the pipeline's, and the
    stack's lifecycle policy finds the images to delete by them.
    """
    token = client_token or str(uuid.uuid4())
    more = {"tags": dict(tags)} if tags else {}
    response = call_with_retries(
        lambda: client.start_image_pipeline_execution(
            imagePipelineArn=pipeline_arn, clientToken=token, **more
        ),
        sleep=sleep,
    )
    return response["imageBuildVersionArn"]


def wait_for_image(
    client: Any,
    image_arn: str,
    *,
    on_progress: ProgressCallback | None = None,
    poll_seconds: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> BuiltAmi:
    """Poll the image until AVAILABLE (return its AMI) or a final state (raise ImageBuildError).

    on_progress(status, elapsed_seconds) is called after every poll.
    """
    started = clock()
    while True:
        image = call_with_retries(
            lambda: client.get_image(imageBuildVersionArn=image_arn), sleep=sleep
        )["image"]
        state = image.get("state", {})
        status = state.get("status", "PENDING")
        if on_progress is not None:
            on_progress(status, clock() - started)
        if status == "AVAILABLE":
            return _built_ami(image_arn, image, client.meta.region_name)
        if status not in IN_PROGRESS:
            raise ImageBuildError(image_arn, status, state.get("reason"), failure_context(image))
        sleep(poll_seconds)


def _built_ami(image_arn: str, image: dict, region: str) -> BuiltAmi:
    amis = image.get("outputResources", {}).get("amis", [])
    if not amis:
        raise ImageBuildError(image_arn, "AVAILABLE", "the image lists no AMI")
    ami = next((a for a in amis if a.get("region") == region), amis[0])
    return BuiltAmi(image_arn, ami["image"], ami.get("name", ""), ami.get("region", region))
