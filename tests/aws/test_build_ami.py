"""build-ami against botocore's Stubber, which checks every request and response shape
against the real Image Builder service model."""

from __future__ import annotations

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import ANY, Stubber
from invoke import Context
from invoke.exceptions import Exit

import tasks
from runner.aws import imagebuilder

REGION = "eu-west-1"
PIPELINE = f"arn:aws:imagebuilder:{REGION}:123456789012:image-pipeline/iris-ramp-worker"
IMAGE = f"arn:aws:imagebuilder:{REGION}:123456789012:image/iris-ramp-worker/1.4.2/1"
AMI_ID = "ami-0123456789abcdef0"
AMI_NAME = "iris-ramp-worker-2026-11-21T05-00-00.000Z"


@pytest.fixture
def client():
    """A real Image Builder client whose calls the Stubber answers."""
    return boto3.client(
        "imagebuilder",
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def image(status: str, reason: str | None = None, amis: list | None = None) -> dict:
    """A get_image response in a given state."""
    state = {"status": status, **({"reason": reason} if reason else {})}
    body = {"arn": IMAGE, "name": "iris-ramp-worker", "version": "1.4.2/1", "state": state}
    if amis is not None:
        body["outputResources"] = {"amis": amis}
    return {"requestId": "r", "image": body}


def started(token=ANY) -> tuple[dict, dict]:
    """A start_image_pipeline_execution response and the request it expects."""
    response = {"requestId": "r", "clientToken": "t", "imageBuildVersionArn": IMAGE}
    return response, {"imagePipelineArn": PIPELINE, "clientToken": token}


def throttle(stubber: Stubber, operation: str, code: str = "ThrottlingException") -> None:
    stubber.add_client_error(operation, service_error_code=code, http_status_code=400)


AVAILABLE_AMI = [{"region": REGION, "image": AMI_ID, "name": AMI_NAME, "accountId": "123456789012"}]


def test_start_then_follow_to_available(client):
    stubber = Stubber(client)
    stubber.add_response("start_image_pipeline_execution", *started())
    for status in ("PENDING", "BUILDING", "BUILDING", "TESTING", "DISTRIBUTING"):
        stubber.add_response("get_image", image(status), {"imageBuildVersionArn": IMAGE})
    stubber.add_response("get_image", image("AVAILABLE", amis=AVAILABLE_AMI))
    seen, sleeps = [], []
    with stubber:
        image_arn = imagebuilder.start_build(client, PIPELINE, sleep=sleeps.append)
        ami = imagebuilder.wait_for_image(
            client,
            image_arn,
            on_progress=lambda status, elapsed: seen.append(status),
            poll_seconds=15,
            sleep=sleeps.append,
        )
    stubber.assert_no_pending_responses()
    assert ami == imagebuilder.BuiltAmi(IMAGE, AMI_ID, AMI_NAME, REGION)
    assert seen == ["PENDING", "BUILDING", "BUILDING", "TESTING", "DISTRIBUTING", "AVAILABLE"]
    assert sleeps == [15] * 5


def test_client_token_is_sent_and_kept_across_throttled_retries(client):
    stubber = Stubber(client)
    throttle(stubber, "start_image_pipeline_execution")
    throttle(stubber, "start_image_pipeline_execution", "CallRateLimitExceededException")
    stubber.add_response("start_image_pipeline_execution", *started("token-1"))
    sleeps = []
    with stubber:
        arn = imagebuilder.start_build(
            client, PIPELINE, client_token="token-1", sleep=sleeps.append
        )
    stubber.assert_no_pending_responses()
    assert arn == IMAGE
    assert len(sleeps) == 2
    assert 0 <= sleeps[0] <= 1 and 0 <= sleeps[1] <= 2


def test_generated_client_token_is_the_same_on_every_attempt(client):
    tokens = []
    client.meta.events.register(
        "provide-client-params.imagebuilder.StartImagePipelineExecution",
        lambda params, **_: tokens.append(params["clientToken"]),
    )
    stubber = Stubber(client)
    throttle(stubber, "start_image_pipeline_execution")
    stubber.add_response("start_image_pipeline_execution", *started())
    with stubber:
        imagebuilder.start_build(client, PIPELINE, sleep=lambda _: None)
    assert len(tokens) == 2 and tokens[0] == tokens[1] and len(tokens[0]) <= 64


def test_throttled_polls_are_retried(client):
    stubber = Stubber(client)
    stubber.add_response("get_image", image("BUILDING"))
    throttle(stubber, "get_image")
    throttle(stubber, "get_image")
    stubber.add_response("get_image", image("AVAILABLE", amis=AVAILABLE_AMI))
    seen = []
    with stubber:
        ami = imagebuilder.wait_for_image(
            client, IMAGE, on_progress=lambda s, _: seen.append(s), sleep=lambda _: None
        )
    assert ami.ami_id == AMI_ID
    assert seen == ["BUILDING", "AVAILABLE"]


def test_throttling_that_never_ends_raises(client):
    stubber = Stubber(client)
    for _ in range(8):
        throttle(stubber, "get_image")
    with stubber, pytest.raises(ClientError, match="ThrottlingException"):
        imagebuilder.wait_for_image(client, IMAGE, sleep=lambda _: None)
    stubber.assert_no_pending_responses()


def test_other_client_errors_are_not_retried(client):
    stubber = Stubber(client)
    stubber.add_client_error(
        "start_image_pipeline_execution",
        service_error_code="ResourceNotFoundException",
        service_message="pipeline not found",
        http_status_code=404,
    )
    with stubber, pytest.raises(ClientError, match="pipeline not found"):
        imagebuilder.start_build(client, PIPELINE, sleep=lambda _: pytest.fail("retried"))


def test_failed_image_raises_with_the_reason(client):
    reason = "Image Builder step RampTestStartingKit failed: ramp-test exited with 1"
    stubber = Stubber(client)
    stubber.add_response("get_image", image("BUILDING"))
    stubber.add_response("get_image", image("FAILED", reason=reason))
    with stubber, pytest.raises(imagebuilder.ImageBuildError) as error:
        imagebuilder.wait_for_image(client, IMAGE, sleep=lambda _: None)
    assert error.value.status == "FAILED"
    assert error.value.reason == reason
    assert reason in str(error.value)


def test_cancelled_image_raises(client):
    stubber = Stubber(client)
    stubber.add_response("get_image", image("CANCELLED", reason="Cancelled by user"))
    with stubber, pytest.raises(imagebuilder.ImageBuildError, match="CANCELLED: Cancelled by user"):
        imagebuilder.wait_for_image(client, IMAGE, sleep=lambda _: None)


def test_region_of_pipeline_arn_and_client():
    assert imagebuilder.region_of(PIPELINE) == REGION
    with pytest.raises(ValueError, match="not a regional ARN"):
        imagebuilder.region_of("iris-ramp-worker")
    client = imagebuilder.make_client(
        PIPELINE, boto3.Session(aws_access_key_id="a", aws_secret_access_key="b")
    )
    assert client.meta.region_name == REGION


@pytest.fixture
def stubbed_task_client(client, monkeypatch):
    """tasks.build_ami gets the stubbed client instead of a real one."""
    stubber = Stubber(client)
    monkeypatch.setattr(imagebuilder, "make_client", lambda arn: client)
    with stubber:
        yield stubber


def test_task_prints_the_ami_on_available(stubbed_task_client, capsys):
    stubbed_task_client.add_response("start_image_pipeline_execution", *started())
    stubbed_task_client.add_response("get_image", image("BUILDING"))
    stubbed_task_client.add_response("get_image", image("AVAILABLE", amis=AVAILABLE_AMI))
    tasks.build_ami(Context(), pipeline_arn=PIPELINE, poll=0)
    out = capsys.readouterr().out
    assert AMI_ID in out and AMI_NAME in out


def test_task_exits_non_zero_with_the_reason_on_failure(stubbed_task_client):
    stubbed_task_client.add_response("start_image_pipeline_execution", *started())
    stubbed_task_client.add_response("get_image", image("FAILED", reason="test phase failed"))
    with pytest.raises(Exit) as error:
        tasks.build_ami(Context(), pipeline_arn=PIPELINE, poll=0)
    assert error.value.code == 1
    assert "test phase failed" in error.value.message


def test_task_no_wait_only_starts(stubbed_task_client, capsys):
    stubbed_task_client.add_response("start_image_pipeline_execution", *started())
    tasks.build_ami(Context(), pipeline_arn=PIPELINE, no_wait=True)
    stubbed_task_client.assert_no_pending_responses()
    assert IMAGE in capsys.readouterr().out


def test_task_reads_the_pipeline_from_stack_outputs(stubbed_task_client, tmp_path, capsys):
    outputs = tmp_path / "outputs.json"
    outputs.write_text(f'{{"pipelineArn": "{PIPELINE}"}}')
    stubbed_task_client.add_response("start_image_pipeline_execution", *started())
    tasks.build_ami(Context(), outputs_file=str(outputs), no_wait=True)
    assert IMAGE in capsys.readouterr().out


COMPONENT = f"arn:aws:imagebuilder:{REGION}:123456789012:component/iris-ramp-worker/1.0.3/1"


def failed_with_context() -> dict:
    """A FAILED get_image answer with Image Builder's failure context, as the service
    model shapes it (the Stubber checks it)."""
    response = image("FAILED", reason="Image Builder workflow failed")
    response["image"]["state"]["failureContext"] = {
        "imageStatus": "BUILDING",
        "failedStep": "ApplyBuildComponents",
        "componentFailure": {
            "componentArn": COMPONENT,
            "phaseName": "build",
            "stepName": "InstallRampKit",
            "action": "ExecuteBash",
            "errorMessage": "pip install failed: No matching distribution for ramp-workflow",
        },
    }
    response["image"]["loggingConfiguration"] = {"logGroupName": "/aws/imagebuilder/iris"}
    return response


def test_failed_image_says_which_component_phase_and_step(client):
    stubber = Stubber(client)
    stubber.add_response("get_image", failed_with_context())
    with stubber, pytest.raises(imagebuilder.ImageBuildError) as error:
        imagebuilder.wait_for_image(client, IMAGE, sleep=lambda _: None)
    message = str(error.value)
    assert "failed while BUILDING at workflow step ApplyBuildComponents" in message
    assert ("component iris-ramp-worker/1.0.3/1, step build/InstallRampKit (ExecuteBash): "
            "pip install failed: No matching distribution for ramp-workflow") in message
    assert "logs: CloudWatch log group /aws/imagebuilder/iris" in message


def test_failed_distribution_names_its_regions(client):
    response = image("FAILED", reason="distribution failed")
    response["image"]["state"]["failureContext"] = {
        "imageStatus": "DISTRIBUTING",
        "distributionFailure": {"errorMessage": "AMI copy failed", "regionFailures": [
            {"region": "eu-west-3", "errorMessage": "AMI quota exceeded"}]},
    }
    stubber = Stubber(client)
    stubber.add_response("get_image", response)
    with stubber, pytest.raises(imagebuilder.ImageBuildError) as error:
        imagebuilder.wait_for_image(client, IMAGE, sleep=lambda _: None)
    assert "distribution: AMI copy failed" in str(error.value)
    assert "eu-west-3: AMI quota exceeded" in str(error.value)


def test_task_tags_the_image_and_shows_the_failure_context(stubbed_task_client, tmp_path):
    outputs = tmp_path / "outputs.json"
    outputs.write_text(f'{{"pipelineArn": "{PIPELINE}", '
                       '"imageTags": {"ramp-runner:challenge": "iris"}}')
    response, expected = started()
    stubbed_task_client.add_response("start_image_pipeline_execution", response,
                                     {**expected, "tags": {"ramp-runner:challenge": "iris"}})
    stubbed_task_client.add_response("get_image", failed_with_context())
    with pytest.raises(Exit) as error:
        tasks.build_ami(Context(), outputs_file=str(outputs), poll=0)
    assert error.value.code == 1
    assert "step build/InstallRampKit (ExecuteBash)" in error.value.message
