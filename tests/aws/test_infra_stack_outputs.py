"""Stack outputs into the event config: reading them (file or pulumi CLI) and writing them."""

from __future__ import annotations

import json
import os
import stat

import pytest
import yaml
from invoke import Context
from invoke.exceptions import Exit

import tasks
from runner.aws import stack_outputs

OUTPUTS = {
    "pipelineArn": "arn:aws:imagebuilder:eu-west-1:123456789012:image-pipeline/iris-ramp-worker",
    "amiBaseName": "iris-ramp-worker",
    "securityGroupName": "iris-ramp-workers",
    "securityGroupId": "sg-0123",
    "keyName": "iris-ramp-worker",
    "region": "eu-west-1",
    "instanceUser": "ubuntu",
    "remoteKitFolder": "/home/ubuntu/ramp-kits/iris",
}
EVENT = {
    "ramp": {"problem_name": "iris", "event_name": "iris_aws", "event_title": "iris on aws"},
    "worker": {
        "worker_type": "aws",
        "instance_type": "t3.large",
        "use_spot_instance": True,
        "key_path": "/secure/iris.pem",
        "region_name": "us-west-2",
        "submissions_dir": "submissions",
    },
    "dispatcher": {"n_workers": 4, "hunger_policy": "sleep"},
}


@pytest.fixture
def event_config(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(EVENT, sort_keys=False))
    path.chmod(0o640)
    return path


@pytest.fixture
def outputs_file(tmp_path):
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps(OUTPUTS))
    return path


@pytest.fixture
def fake_pulumi(tmp_path, monkeypatch):
    """A `pulumi` on PATH that records its arguments and prints OUTPUTS."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "pulumi-args"
    script = bin_dir / "pulumi"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" > "{record}"\n'
        'if [ -n "$PULUMI_FAIL" ]; then echo "error: no stack selected" >&2; exit 255; fi\n'
        f"cat <<'JSON'\n{json.dumps(OUTPUTS)}\nJSON\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return record


def test_read_from_file(outputs_file):
    assert stack_outputs.read_stack_outputs(outputs_file) == OUTPUTS


@pytest.mark.parametrize("content", ["not json", "[1, 2]"])
def test_read_bad_file(tmp_path, content):
    path = tmp_path / "outputs.json"
    path.write_text(content)
    with pytest.raises(stack_outputs.StackOutputsError):
        stack_outputs.read_stack_outputs(path)


def test_read_from_the_pulumi_cli(fake_pulumi):
    assert stack_outputs.read_stack_outputs(stack="dev") == OUTPUTS
    args = fake_pulumi.read_text().split()
    assert args[:3] == ["stack", "output", "--json"]
    assert args[args.index("--cwd") + 1] == str(stack_outputs.INFRA_DIR)
    assert args[args.index("--stack") + 1] == "dev"


def test_pulumi_cli_failure_is_reported(fake_pulumi, monkeypatch):
    monkeypatch.setenv("PULUMI_FAIL", "1")
    with pytest.raises(stack_outputs.StackOutputsError, match="no stack selected"):
        stack_outputs.read_stack_outputs()


def test_without_cli_or_file_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(stack_outputs.StackOutputsError, match="--outputs-file"):
        stack_outputs.read_stack_outputs()


def test_write_sets_worker_keys_and_keeps_everything_else(event_config):
    written = stack_outputs.write_worker_settings(event_config, OUTPUTS)
    assert written == {
        "ami_image_name": "iris-ramp-worker",
        "security_group": "iris-ramp-workers",
        "key_name": "iris-ramp-worker",
        "region_name": "eu-west-1",
        "ami_user_name": "ubuntu",
        "remote_ramp_kit_folder": "/home/ubuntu/ramp-kits/iris",
    }
    document = yaml.safe_load(event_config.read_text())
    assert document["ramp"] == EVENT["ramp"]
    assert document["dispatcher"] == EVENT["dispatcher"]
    assert document["worker"] == {**EVENT["worker"], **written}
    assert list(document) == list(EVENT)
    assert stat.S_IMODE(event_config.stat().st_mode) == 0o640
    assert sorted(p.name for p in event_config.parent.iterdir()) == ["config.yml"]


def test_write_creates_an_aws_worker_section(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"ramp": EVENT["ramp"]}))
    stack_outputs.write_worker_settings(path, OUTPUTS)
    worker = yaml.safe_load(path.read_text())["worker"]
    assert worker["worker_type"] == "aws"
    assert worker["ami_image_name"] == "iris-ramp-worker"


def test_write_refuses_another_worker_type(event_config):
    before = event_config.read_text()
    event_config.write_text(before.replace("worker_type: aws", "worker_type: conda"))
    changed = event_config.read_text()
    with pytest.raises(stack_outputs.StackOutputsError, match="worker_type"):
        stack_outputs.write_worker_settings(event_config, OUTPUTS)
    assert event_config.read_text() == changed


def test_missing_outputs_are_named(event_config):
    partial = {k: v for k, v in OUTPUTS.items() if k not in ("keyName", "region")}
    with pytest.raises(stack_outputs.StackOutputsError, match="keyName, region"):
        stack_outputs.write_worker_settings(event_config, partial)


def test_a_failed_replace_leaves_the_file_and_no_temporary(event_config, monkeypatch):
    before = event_config.read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(stack_outputs.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        stack_outputs.write_worker_settings(event_config, OUTPUTS)
    assert event_config.read_text() == before
    assert sorted(p.name for p in event_config.parent.iterdir()) == ["config.yml"]


def test_pipeline_arn_output():
    assert stack_outputs.pipeline_arn(OUTPUTS) == OUTPUTS["pipelineArn"]
    with pytest.raises(stack_outputs.StackOutputsError, match="pipelineArn"):
        stack_outputs.pipeline_arn({})


def test_aws_config_task(event_config, outputs_file, capsys):
    tasks.aws_config(Context(), str(event_config), outputs_file=str(outputs_file))
    assert "worker.ami_image_name: iris-ramp-worker" in capsys.readouterr().out
    assert yaml.safe_load(event_config.read_text())["worker"]["key_name"] == "iris-ramp-worker"


def test_aws_config_task_error_exits_2(event_config, tmp_path):
    with pytest.raises(Exit) as error:
        tasks.aws_config(Context(), str(event_config), outputs_file=str(tmp_path / "none.json"))
    assert error.value.code == 2
    assert "none.json" in error.value.message


def test_write_points_the_event_at_the_launch_template_challenge_and_run_user(event_config):
    outputs = {**OUTPUTS, "launchTemplateId": "lt-0123456789abcdef0",
               "workerTags": {"ramp-runner:challenge": "iris"}, "runUser": "ramp-run"}
    written = stack_outputs.write_worker_settings(event_config, outputs)
    assert (written["launch_template_id"], written["challenge_name"],
            written["run_as_user"]) == ("lt-0123456789abcdef0", "iris", "ramp-run")
    worker = yaml.safe_load(event_config.read_text())["worker"]
    assert (worker["launch_template_id"], worker["challenge_name"], worker["run_as_user"]) == (
        "lt-0123456789abcdef0", "iris", "ramp-run")
