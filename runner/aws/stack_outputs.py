"""Pulumi stack outputs: read them, and write them into an event config's worker section."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from runner.errors import RunnerError
from runner.strict_yaml import load_yaml

INFRA_DIR = Path(__file__).resolve().parents[2] / "infra"
# Stack output -> key of the event's worker section (seed names). The first four are required.
WORKER_KEYS = {
    "amiBaseName": "ami_image_name",
    "securityGroupName": "security_group",
    "keyName": "key_name",
    "region": "region_name",
    "instanceUser": "ami_user_name",
    "remoteKitFolder": "remote_ramp_kit_folder",
    "launchTemplateId": "launch_template_id",
    "runUser": "run_as_user",
}
# The challenge tag in the stack output ``workerTags`` (infra/tags.py).
CHALLENGE_TAG = "ramp-runner:challenge"
REQUIRED_OUTPUTS = ("amiBaseName", "securityGroupName", "keyName", "region")


class StackOutputsError(RunnerError, RuntimeError):
    """Stack outputs could not be read, or do not fit the event config."""

    exit_code = 2


def read_stack_outputs(
    outputs_file: str | Path | None = None,
    *,
    stack: str | None = None,
    infra_dir: Path = INFRA_DIR,
) -> dict[str, Any]:
    """Outputs from a JSON file if given, else from `pulumi stack output --json`."""
    if outputs_file is not None:
        try:
            outputs = json.loads(Path(outputs_file).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise StackOutputsError(
                f"cannot read stack outputs from {outputs_file}: {error}"
            ) from None
    else:
        pulumi = shutil.which("pulumi")
        if pulumi is None:
            raise StackOutputsError(
                "the pulumi CLI is not on PATH; pass --outputs-file with the JSON of "
                "`pulumi stack output --json`"
            )
        argv = [pulumi, "stack", "output", "--json", "--cwd", str(infra_dir)]
        if stack:
            argv += ["--stack", stack]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise StackOutputsError(f"{' '.join(argv[1:])} failed: {result.stderr.strip()}")
        outputs = json.loads(result.stdout)
    if not isinstance(outputs, dict):
        raise StackOutputsError("stack outputs must be a JSON object")
    return outputs


def pipeline_arn(outputs: Mapping[str, Any]) -> str:
    """The pipeline ARN output, or a clear error."""
    arn = outputs.get("pipelineArn")
    if not arn:
        raise StackOutputsError("the stack outputs have no pipelineArn (did `pulumi up` run?)")
    return arn


def worker_settings(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """The worker keys the stack knows, under their event-config names."""
    missing = [key for key in REQUIRED_OUTPUTS if not outputs.get(key)]
    if missing:
        raise StackOutputsError(f"the stack outputs lack {', '.join(missing)}")
    settings = {worker: outputs[key] for key, worker in WORKER_KEYS.items() if outputs.get(key)}
    challenge = (outputs.get("workerTags") or {}).get(CHALLENGE_TAG)
    if challenge:
        settings["challenge_name"] = challenge
    return settings


def write_worker_settings(event_config: str | Path, outputs: Mapping[str, Any]) -> dict[str, Any]:
    """Merge the stack's settings into the worker section, keep every other key; return them.

    The file is replaced atomically (temp file in the same folder, then os.replace), so a
    dispatcher reading it never sees half a file. YAML comments are not kept.
    """
    path = Path(event_config)
    settings = worker_settings(outputs)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise StackOutputsError(f"cannot read {path}: {error.strerror}") from None
    # The event config's own strict reading: a broken file is one ConfigError naming it.
    document = load_yaml(data, str(path)) or {}
    if not isinstance(document, dict):
        raise StackOutputsError(f"{path} is not a YAML mapping")
    worker = document.get("worker") or {}
    if not isinstance(worker, dict):
        raise StackOutputsError(f"{path}: worker is not a mapping")
    worker_type = worker.get("worker_type", "aws")
    if worker_type != "aws":
        raise StackOutputsError(
            f"{path}: worker.worker_type is {worker_type!r}; AWS settings need worker_type aws"
        )
    document["worker"] = {"worker_type": "aws", **worker, **settings}
    _replace_atomically(path, yaml.safe_dump(document, sort_keys=False, default_flow_style=False))
    return settings


def _replace_atomically(path: Path, text: str) -> None:
    mode = path.stat().st_mode & 0o7777
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
