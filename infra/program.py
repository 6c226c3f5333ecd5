"""The stack: data secrets, AMI pipeline and lifecycle, worker access and launch, the reaper,
wired from the stack config."""

from __future__ import annotations

from pathlib import Path

import pulumi

from .ami_documents import DOCUMENTS_DIR
from .ami_lifecycle import AmiLifecycle, image_tags
from .ami_pipeline import AmiPipeline, build_log_group
from .data_secrets import DataSecrets
from .reaper import InstanceReaper
from .stack_config import StackConfig, read_stack_config
from .tags import challenge_tags
from .worker_access import WorkerAccess
from .worker_contract import HEARTBEAT_FILE, HEARTBEAT_TIMEOUT_SECONDS, RUN_USER
from .worker_launch import WorkerLaunch


def build(config: StackConfig, documents_dir: Path = DOCUMENTS_DIR) -> dict[str, pulumi.Input]:
    """Declare every resource; return the stack outputs that build-ami and aws-config read."""
    prefix = config.challenge_name
    secrets = DataSecrets(f"{prefix}-data", config)
    pipeline = AmiPipeline(
        f"{prefix}-ami", config, secrets.names, secrets.arns, documents_dir=documents_dir
    )
    lifecycle = AmiLifecycle(f"{prefix}-ami-lifecycle", config)
    access = WorkerAccess(f"{prefix}-access", config)
    launch = WorkerLaunch(
        f"{prefix}-launch", config, access.security_group, access.key_pair, pipeline.root_device
    )
    reaper = InstanceReaper(f"{prefix}-reaper", config)
    return {
        "pipelineArn": pipeline.pipeline.arn,
        # Where a failed build's step logs are, for build-ami to name with Image Builder's
        # failure context.
        "buildLogGroup": build_log_group(config),
        "amiBaseName": config.ami_base_name,
        "imageTags": image_tags(config),
        "lifecyclePolicyArn": lifecycle.policy.arn,
        "securityGroupName": access.security_group.name,
        "securityGroupId": access.security_group.id,
        "keyName": access.key_pair.key_name,
        "launchTemplateId": launch.launch_template.id,
        "launchTemplateName": launch.launch_template.name,
        "dispatcherPolicyArn": launch.dispatcher_policy.arn,
        "workerTags": challenge_tags(config.challenge_name),
        "reaperFunctionName": reaper.function.name,
        "region": config.region,
        "instanceUser": config.instance_user,
        "runUser": RUN_USER,
        "heartbeatFile": HEARTBEAT_FILE,
        "heartbeatTimeoutSeconds": HEARTBEAT_TIMEOUT_SECONDS,
        "remoteKitFolder": config.remote_kit_folder,
    }


def main() -> None:
    """Entry point of `pulumi up`: read the config, declare, export."""
    for key, value in build(read_stack_config()).items():
        pulumi.export(key, value)
