"""The stack: data secrets, AMI pipeline and worker access, wired from the stack config."""

from __future__ import annotations

from pathlib import Path

import pulumi

from .ami_documents import DOCUMENTS_DIR
from .ami_pipeline import AmiPipeline
from .data_secrets import DataSecrets
from .stack_config import StackConfig, read_stack_config
from .worker_access import WorkerAccess
from .worker_contract import HEARTBEAT_FILE, HEARTBEAT_TIMEOUT_SECONDS, RUN_USER


def build(config: StackConfig, documents_dir: Path = DOCUMENTS_DIR) -> dict[str, pulumi.Input]:
    """Declare every resource; return the stack outputs that build-ami and aws-config read."""
    prefix = config.challenge_name
    secrets = DataSecrets(f"{prefix}-data", config)
    pipeline = AmiPipeline(
        f"{prefix}-ami", config, secrets.names, secrets.arns, documents_dir=documents_dir
    )
    access = WorkerAccess(f"{prefix}-access", config)
    return {
        "pipelineArn": pipeline.pipeline.arn,
        "amiBaseName": config.ami_base_name,
        "securityGroupName": access.security_group.name,
        "securityGroupId": access.security_group.id,
        "keyName": access.key_pair.key_name,
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
