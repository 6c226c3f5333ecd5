"""runner.aws.ec2 against moto's EC2 server: AMI choice, launch, fallback, retries, reap."""

from __future__ import annotations

import base64

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError

from runner.aws import ec2
from runner.errors import InfrastructureError
from tests.sshd import AMI_BASE, REGION, add_ami, all_instances, live_instances


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


TAG = {"ramp-runner:ami-base-name": AMI_BASE}  # the key infra's distribution writes


def test_newest_ami_is_ours_with_greatest_creation_date(client):
    add_ami(f"{AMI_BASE}-b-older", "2024-03-01T00:00:00+00:00", tags=TAG)
    newest = add_ami(f"{AMI_BASE}-a-newest", "2024-06-01T00:00:00+00:00", tags=TAG)
    add_ami(f"{AMI_BASE}-c-failed", "2024-07-01T00:00:00+00:00", state="failed", tags=TAG)
    # A stranger's public image with our base name and tag, newer than ours: RAMP would take it.
    foreign = add_ami(f"{AMI_BASE}-evil", "2025-01-01T00:00:00+00:00", owner="999999999999",
                      tags=TAG)
    visible = {image["ImageId"] for image in client.describe_images(
        Filters=[{"Name": "name", "Values": [f"{AMI_BASE}*"]}])["Images"]}
    assert foreign in visible  # the trap is armed
    assert ec2.newest_ami(client, AMI_BASE) == newest


def test_newest_ami_is_found_by_its_base_name_tag_not_its_name(client):
    ours = add_ami(f"{AMI_BASE}-2024-06-01", "2024-06-01T00:00:00+00:00", tags=TAG)
    # Another event's GPU image: its name starts with ours, and it is newer.
    add_ami(f"{AMI_BASE}-gpu-2024-09-01", "2024-09-01T00:00:00+00:00",
            tags={"ramp-runner:ami-base-name": f"{AMI_BASE}-gpu"})
    # Named like ours but not written by our distribution (no tag): not ours either.
    add_ami(f"{AMI_BASE}-2024-10-01", "2024-10-01T00:00:00+00:00")
    assert ec2.newest_ami(client, AMI_BASE) == ours
    assert ec2.newest_ami(client, f"{AMI_BASE}-gpu") != ours


def test_newest_ami_accepts_the_tag_of_amis_built_before(client):
    # infra wrote "ramp:ami-base-name" until issue 12; those AMIs stay usable.
    older = add_ami(f"{AMI_BASE}-2024-01-01", "2024-01-01T00:00:00+00:00",
                    tags={"ramp:ami-base-name": AMI_BASE})
    assert ec2.newest_ami(client, AMI_BASE) == older
    newer = add_ami(f"{AMI_BASE}-2024-02-01", "2024-02-01T00:00:00+00:00", tags=TAG)
    assert ec2.newest_ami(client, AMI_BASE) == newer
    add_ami(f"{AMI_BASE}-gpu-2024-03-01", "2024-03-01T00:00:00+00:00",
            tags={"ramp:ami-base-name": f"{AMI_BASE}-gpu"})
    assert ec2.newest_ami(client, AMI_BASE) == newer


def test_no_matching_ami_names_base_name_tag_and_region(client):
    add_ami("something-else", "2024-01-01T00:00:00+00:00")
    add_ami(f"{AMI_BASE}-untagged", "2024-01-01T00:00:00+00:00")
    with pytest.raises(ec2.AMINotFoundError) as caught:
        ec2.newest_ami(client, AMI_BASE)
    message = str(caught.value)
    assert AMI_BASE in message and REGION in message and ec2.TAG_AMI_BASE_NAME in message
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


@pytest.mark.parametrize(("code", "status"), [
    # EC2 answers a capacity shortage with a server error (5xx), which botocore's
    # standard mode would retry seven times before the fallback got its turn.
    ("InsufficientInstanceCapacity", 500), ("InsufficientCapacity", 500),
    ("UnfulfillableCapacity", 400), ("SpotMaxPriceTooLow", 400),
    ("MaxSpotInstanceCountExceeded", 400)])
def test_spot_capacity_error_falls_back_to_on_demand_at_once(client, code, status, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda seconds: None)  # botocore's backoff, if any
    image = add_ami(f"{AMI_BASE}-1", "2024-01-01T00:00:00+00:00")
    spot_requests = []

    def no_spot(request, **_):
        if "InstanceMarketOptions" in _body(request):
            spot_requests.append(request)
            return _error(code, status)
        return None

    client.meta.events.register("before-send.ec2.RunInstances", no_spot)
    instance = _launch(client, image, spot=True)
    assert len(spot_requests) == 1 and not instance.spot
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


def test_spot_attempt_still_retries_throttling(client, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda seconds: None)
    image = add_ami(f"{AMI_BASE}-1", "2024-01-01T00:00:00+00:00")
    failures = []

    def throttled(request, **_):
        if len(failures) < 2:
            failures.append(request)
            return _error("RequestLimitExceeded", 503)
        return None

    client.meta.events.register("before-send.ec2.RunInstances", throttled)
    instance = _launch(client, image, spot=True)
    assert len(failures) == 2 and instance.spot


def test_on_demand_capacity_errors_keep_botocore_retries(client, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda seconds: None)
    image = add_ami(f"{AMI_BASE}-1", "2024-01-01T00:00:00+00:00")
    failures = []

    def short(request, **_):
        if len(failures) < 2:
            failures.append(request)
            return _error("InsufficientInstanceCapacity", 500)
        return None

    client.meta.events.register("before-send.ec2.RunInstances", short)
    assert not _launch(client, image).spot
    assert len(failures) == 2


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


def _not_found_first(client, operation, times):
    """Answer the first ``times`` calls of ``operation`` with InvalidInstanceID.NotFound, as
    EC2 may right after RunInstances (eventual consistency); return the list of calls."""
    calls = []

    def answer(request, **_):
        calls.append(request)
        if len(calls) <= times:
            return _error("InvalidInstanceID.NotFound", 400)
        return None

    client.meta.events.register(f"before-send.ec2.{operation}", answer)
    return calls


@pytest.fixture
def quick_polls(monkeypatch):
    monkeypatch.setattr(ec2, "RUNNING_POLL_SECONDS", 0.05)


def test_not_found_right_after_launch_is_pending_not_terminated(client, quick_polls):
    image = add_ami(f"{AMI_BASE}-1", "2024-01-01T00:00:00+00:00")
    instance = _launch(client, image)
    calls = _not_found_first(client, "DescribeInstances", 3)
    ec2.wait_until_running(client, instance.instance_id, timeout=30)
    assert len(calls) == 4
    assert ec2.instance_state(client, instance.instance_id) == "running"


def test_not_found_for_the_whole_wait_is_a_timeout(client, quick_polls):
    image = add_ami(f"{AMI_BASE}-1", "2024-01-01T00:00:00+00:00")
    instance = _launch(client, image)
    _not_found_first(client, "DescribeInstances", 10**6)
    with pytest.raises(TimeoutError, match=instance.instance_id):
        ec2.wait_until_running(client, instance.instance_id, timeout=1)
    assert ec2.instance_state(client, instance.instance_id) is None  # EC2 does not know it yet


def test_not_found_from_terminate_is_not_proof_of_termination(client, quick_polls):
    image = add_ami(f"{AMI_BASE}-1", "2024-01-01T00:00:00+00:00")
    instance = _launch(client, image)
    calls = _not_found_first(client, "TerminateInstances", 2)
    ec2.terminate(client, [instance.instance_id])
    assert len(calls) == 3
    assert live_instances(client) == []


def test_termination_is_confirmed_by_describing_it(client, quick_polls):
    image = add_ami(f"{AMI_BASE}-1", "2024-01-01T00:00:00+00:00")
    instance = _launch(client, image)
    # Terminate answers NotFound and Describe does too for a while: keep at it.
    terminates = _not_found_first(client, "TerminateInstances", 1)
    describes = _not_found_first(client, "DescribeInstances", 2)
    ec2.terminate(client, [instance.instance_id])
    assert len(terminates) >= 2 and len(describes) >= 3
    assert live_instances(client) == []


def test_termination_that_cannot_be_confirmed_raises(client, quick_polls, monkeypatch):
    monkeypatch.setattr(ec2, "CONSISTENCY_TIMEOUT", 1.0)
    image = add_ami(f"{AMI_BASE}-1", "2024-01-01T00:00:00+00:00")
    instance = _launch(client, image)
    _not_found_first(client, "TerminateInstances", 10**6)
    _not_found_first(client, "DescribeInstances", 10**6)
    with pytest.raises(InfrastructureError, match=instance.instance_id):
        ec2.terminate(client, [instance.instance_id])


def _old_botocore_needs_retry(monkeypatch):
    """botocore before 1.43.3: any answer of a needs-retry handler that is not None, False
    included, meant "retry after sleeping that many seconds"."""
    import botocore.endpoint
    from botocore.hooks import first_non_none_response

    def needs_retry(self, attempts, operation_model, request_dict, response=None,
                    caught_exception=None):
        service_id = operation_model.service_model.service_id.hyphenize()
        responses = self._event_emitter.emit(
            f"needs-retry.{service_id}.{operation_model.name}", response=response,
            endpoint=self, operation=operation_model, attempts=attempts,
            caught_exception=caught_exception, request_dict=request_dict)
        handler_response = first_non_none_response(responses)
        if handler_response is None:
            return False
        return True  # (it slept handler_response seconds: 0 for False)

    monkeypatch.setattr(botocore.endpoint.Endpoint, "_needs_retry", needs_retry)


@pytest.mark.parametrize("botocore_behaviour", ["since 1.43.3", "before 1.43.3"])
def test_spot_fallback_holds_on_every_botocore_behaviour(client, monkeypatch,
                                                         botocore_behaviour):
    if botocore_behaviour == "before 1.43.3":
        _old_botocore_needs_retry(monkeypatch)
    monkeypatch.setattr("time.sleep", lambda seconds: None)
    image = add_ami(f"{AMI_BASE}-1", "2024-01-01T00:00:00+00:00")
    spot_requests = []

    def no_spot(request, **_):
        if "InstanceMarketOptions" in _body(request):
            spot_requests.append(request)
            # A bound on the runaway loop, so that a failure is a count and not a hang.
            return _error("InsufficientInstanceCapacity", 500) if len(spot_requests) < 50 \
                else None
        return None

    client.meta.events.register("before-send.ec2.RunInstances", no_spot)
    instance = _launch(client, image, spot=True)
    assert (len(spot_requests), instance.spot) == (1, False)
    assert len(live_instances(client)) == 1


def _volume_of(client, instance_id):
    [volume] = client.describe_volumes(Filters=[
        {"Name": "attachment.instance-id", "Values": [instance_id]}])["Volumes"]
    return volume


def test_launch_without_a_template_asks_imdsv2_and_an_encrypted_root(client):
    image = add_ami(f"{AMI_BASE}-1", "2024-01-01T00:00:00+00:00")
    instance = _launch(client, image)
    described = _describe(client, instance.instance_id)
    assert described["MetadataOptions"]["HttpTokens"] == "required"
    assert described["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
    root = _volume_of(client, instance.instance_id)
    assert root["Encrypted"] is True
    assert root["Attachments"][0]["Device"] == described["RootDeviceName"]
    assert (instance.instance_type, instance.market) == ("t3.micro", "on-demand")


def test_launch_through_the_stack_template(client):
    image = add_ami(f"{AMI_BASE}-1", "2024-01-01T00:00:00+00:00")
    group = client.describe_security_groups(GroupNames=["ramp-workers"])["SecurityGroups"][0]
    template = client.create_launch_template(LaunchTemplateName="iris-ramp-worker",
                                             LaunchTemplateData={
        "KeyName": "stack-key", "SecurityGroupIds": [group["GroupId"]],
        "InstanceInitiatedShutdownBehavior": "terminate",
        "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1},
        "BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {
            "Encrypted": True, "VolumeType": "gp3", "VolumeSize": 8,
            "DeleteOnTermination": True}}],
    })["LaunchTemplate"]["LaunchTemplateId"]
    sent = []
    client.meta.events.register("before-send.ec2.RunInstances",
                                lambda request, **_: sent.append(_body(request)))
    instance = _launch(client, image, key_name="event-key", launch_template_id=template)
    # The template gives the key, the group, the volume and the shutdown: the policy
    # allows the launch only through it.
    assert f"LaunchTemplate.LaunchTemplateId={template}" in sent[0]
    assert "KeyName" not in sent[0] and "BlockDeviceMapping" not in sent[0]
    assert "MetadataOptions.HttpTokens=required" in sent[0]
    described = _describe(client, instance.instance_id)
    assert described["KeyName"] == "stack-key"
    # moto adds its default root volume beside the template's; EC2 maps the template's
    # over the AMI's root device.
    volumes = client.describe_volumes(Filters=[
        {"Name": "attachment.instance-id", "Values": [instance.instance_id]}])["Volumes"]
    assert [(v["Size"], v["Encrypted"]) for v in volumes if v["VolumeType"] == "gp3"] == [
        (8, True)]


def test_deadline_tag_is_what_the_stack_reaper_reads():
    from datetime import UTC, datetime

    from infra.reaper_lambda import parse_deadline

    at = 1_796_500_000.0
    value = ec2.deadline_tag(at)
    assert value.endswith("Z") and "." not in value
    assert parse_deadline(value) == datetime.fromtimestamp(at, UTC)
    assert ec2.parse_deadline(value) == at
    assert ec2.parse_deadline("not a time") is None and ec2.parse_deadline(None) is None


def test_spot_price_comes_from_the_instance_zone_history(client):
    from runner.aws import cost

    image = add_ami(f"{AMI_BASE}-1", "2024-01-01T00:00:00+00:00")
    instance = _launch(client, image, spot=True)
    zone = _describe(client, instance.instance_id)["Placement"]["AvailabilityZone"]
    history = client.describe_spot_price_history(InstanceTypes=["t3.micro"],
                                                 AvailabilityZone=zone)["SpotPriceHistory"]
    expected = max(float(entry["SpotPrice"]) for entry in history
                   if entry["AvailabilityZone"] == zone)
    price = cost.spot_price(client, instance.instance_id, "t3.micro", instance.launched_at,
                            instance.launched_at + 120)
    assert price == expected
    usage = cost.InstanceUsage(instance.instance_id, "t3.micro", "spot", 100.0, 130.0, 0.36)
    assert usage.seconds == 60.0  # billed a minute at least
    assert usage.cost_usd == pytest.approx(0.006)
