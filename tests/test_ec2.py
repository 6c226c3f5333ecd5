"""runner.aws.ec2 against moto's EC2 server: AMI choice, launch, fallback, retries, reap."""

from __future__ import annotations

import base64

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError

from runner.aws import ec2
from tests.sshd import AMI_BASE, REGION, add_ami, all_instances, aws, live_instances, moto_server

__all__ = ["aws", "moto_server"]  # fixtures, imported for pytest


class _Raw:
    def __init__(self, body: bytes):
        self.body = body

    def stream(self, **_):
        yield self.body


def _error(code: str, status: int) -> AWSResponse:
    body = (f"<?xml version='1.0' encoding='UTF-8'?><Response><Errors><Error><Code>{code}"
            "</Code><Message>injected by the test</Message></Error></Errors>"
            "<RequestID>test</RequestID></Response>").encode()
    return AWSResponse("https://ec2.test", status, {}, _Raw(body))


def _body(request) -> str:
    body = request.body
    return body.decode() if isinstance(body, bytes) else str(body or "")


@pytest.fixture
def client(aws):
    aws.create_security_group(GroupName="ramp-workers", Description="ramp workers")
    return ec2.client(REGION)


def _launch(client, image_id, **more):
    arguments = dict(image_id=image_id, instance_type="t3.micro", key_name="iris_key",
                     security_group="ramp-workers", tags={ec2.TAG_EVENT: "iris"}, spot=False)
    arguments.update(more)
    return ec2.launch_instance(client, **arguments)


def _describe(client, instance_id):
    return client.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]


def test_newest_ami_is_ours_with_greatest_creation_date(client):
    add_ami(f"{AMI_BASE}-b-older", "2024-03-01T00:00:00+00:00")
    newest = add_ami(f"{AMI_BASE}-a-newest", "2024-06-01T00:00:00+00:00")
    add_ami(f"{AMI_BASE}-c-failed", "2024-07-01T00:00:00+00:00", state="failed")
    add_ami(f"other-{AMI_BASE}", "2024-08-01T00:00:00+00:00")
    # A stranger's public image with our base name, newer than ours: RAMP would take it.
    foreign = add_ami(f"{AMI_BASE}-evil", "2025-01-01T00:00:00+00:00", owner="999999999999")
    visible = {image["ImageId"] for image in client.describe_images(
        Filters=[{"Name": "name", "Values": [f"{AMI_BASE}*"]}])["Images"]}
    assert foreign in visible  # the trap is armed
    assert ec2.newest_ami(client, AMI_BASE) == newest


def test_no_matching_ami_names_base_name_and_region(client):
    add_ami("something-else", "2024-01-01T00:00:00+00:00")
    with pytest.raises(ec2.AMINotFoundError) as caught:
        ec2.newest_ami(client, AMI_BASE)
    assert AMI_BASE in str(caught.value) and REGION in str(caught.value)
    assert isinstance(caught.value, ValueError)  # a configuration problem for the dispatcher


def test_pinned_ami_must_exist(client):
    image = add_ami(f"{AMI_BASE}-pinned", "2024-01-01T00:00:00+00:00")
    assert ec2.pinned_ami(client, image) == image
    with pytest.raises(ec2.AMINotFoundError, match="ami-00000000"):
        ec2.pinned_ami(client, "ami-00000000")


def test_on_demand_launch_is_tagged_and_self_terminating(client):
    image = add_ami(f"{AMI_BASE}-1", "2024-01-01T00:00:00+00:00")
    tags = {ec2.TAG_EVENT: "iris", ec2.TAG_SUBMISSION: "starting_kit",
            ec2.TAG_DISPATCHER: "d-1"}
    instance = _launch(client, image, tags=tags,
                       user_data=ec2.self_destruct_user_data(7200 + 1800))
    assert not instance.spot
    described = _describe(client, instance.instance_id)
    assert "InstanceLifecycle" not in described
    assert {t["Key"]: t["Value"] for t in described["Tags"]} == tags
    behaviour = client.describe_instance_attribute(
        InstanceId=instance.instance_id, Attribute="instanceInitiatedShutdownBehavior")
    assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    user_data = client.describe_instance_attribute(
        InstanceId=instance.instance_id, Attribute="userData")["UserData"]["Value"]
    assert "shutdown -h +150 " in base64.b64decode(user_data).decode()


def test_spot_launch(client):
    image = add_ami(f"{AMI_BASE}-1", "2024-01-01T00:00:00+00:00")
    instance = _launch(client, image, spot=True)
    assert instance.spot
    assert _describe(client, instance.instance_id)["InstanceLifecycle"] == "spot"


@pytest.mark.parametrize("code", ["InsufficientInstanceCapacity", "SpotMaxPriceTooLow",
                                  "MaxSpotInstanceCountExceeded"])
def test_spot_capacity_error_falls_back_to_on_demand(client, code):
    image = add_ami(f"{AMI_BASE}-1", "2024-01-01T00:00:00+00:00")
    spot_requests = []

    def no_spot(request, **_):
        if "InstanceMarketOptions" in _body(request):
            spot_requests.append(request)
            return _error(code, 400)
        return None

    client.meta.events.register("before-send.ec2.RunInstances", no_spot)
    instance = _launch(client, image, spot=True)
    assert spot_requests and not instance.spot
    assert "InstanceLifecycle" not in _describe(client, instance.instance_id)
    assert len(live_instances(client)) == 1


def test_spot_capacity_error_without_fallback_raises(client):
    image = add_ami(f"{AMI_BASE}-1", "2024-01-01T00:00:00+00:00")
    client.meta.events.register(
        "before-send.ec2.RunInstances",
        lambda request, **_: _error("InsufficientInstanceCapacity", 400))
    with pytest.raises(ClientError, match="InsufficientInstanceCapacity"):
        _launch(client, image, spot=True, spot_fallback_on_demand=False)
    assert all_instances(client) == []


def test_other_launch_errors_do_not_fall_back(client):
    image = add_ami(f"{AMI_BASE}-1", "2024-01-01T00:00:00+00:00")
    client.meta.events.register(
        "before-send.ec2.RunInstances",
        lambda request, **_: _error("InvalidKeyPair.NotFound", 400))
    with pytest.raises(ClientError, match="InvalidKeyPair"):
        _launch(client, image, spot=True)


@pytest.mark.parametrize(("code", "status"), [("RequestLimitExceeded", 503),
                                              ("InternalError", 500)])
def test_throttling_and_server_errors_are_retried(client, code, status, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda seconds: None)  # botocore's backoff
    image = add_ami(f"{AMI_BASE}-1", "2024-01-01T00:00:00+00:00")
    failures = []

    def flaky(request, **_):
        if len(failures) < 3:
            failures.append(request)
            return _error(code, status)
        return None

    client.meta.events.register("before-send.ec2.RunInstances", flaky)
    instance = _launch(client, image)
    assert len(failures) == 3
    assert [i["InstanceId"] for i in live_instances(client)] == [instance.instance_id]


def test_terminate_and_reap_only_unowned_instances_of_the_event(client):
    image = add_ami(f"{AMI_BASE}-1", "2024-01-01T00:00:00+00:00")
    mine = _launch(client, image, tags={ec2.TAG_EVENT: "iris", ec2.TAG_OWNER: "alive"})
    orphan = _launch(client, image, tags={ec2.TAG_EVENT: "iris", ec2.TAG_OWNER: "dead"})
    other_event = _launch(client, image, tags={ec2.TAG_EVENT: "mnist", ec2.TAG_OWNER: "dead"})

    def owned(tags):
        return tags.get(ec2.TAG_OWNER) == "alive"

    assert ec2.reap(client, "iris", owned, dry_run=True) == [orphan.instance_id]
    assert len(live_instances(client)) == 3
    assert ec2.reap(client, "iris", owned) == [orphan.instance_id]
    assert ec2.instance_state(client, orphan.instance_id) in ("shutting-down", "terminated")
    assert {i["InstanceId"] for i in live_instances(client)} == {mine.instance_id,
                                                                 other_event.instance_id}
    ec2.terminate(client, [mine.instance_id])
    ec2.terminate(client, [mine.instance_id])  # twice is fine
    assert ec2.reap(client, "iris", owned) == []


def test_wait_until_running_and_address(client):
    image = add_ami(f"{AMI_BASE}-1", "2024-01-01T00:00:00+00:00")
    instance = _launch(client, image)
    ec2.wait_until_running(client, instance.instance_id, timeout=30)
    host, port = ec2.instance_address(client, instance.instance_id)
    assert host and port == 22
    ec2.terminate(client, [instance.instance_id])
    with pytest.raises(RuntimeError, match="before it ran"):
        ec2.wait_until_running(client, instance.instance_id, timeout=30)


def test_explicit_keys_are_used_and_hidden(aws, caplog):
    caplog.set_level("DEBUG")
    secret = "SECRETxSECRETxSECRETxSECRET"
    client = ec2.client(REGION, access_key_id="AKIAEXPLICIT", secret_access_key=secret)
    assert client._request_signer._credentials.access_key == "AKIAEXPLICIT"
    client.describe_images(Owners=["self"])
    assert secret not in caplog.text and secret not in repr(client)
