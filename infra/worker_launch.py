"""How the dispatcher launches workers: a launch template, and a policy that allows no other way."""

from __future__ import annotations

import json

import pulumi
import pulumi_aws as aws

from .stack_config import StackConfig
from .tags import (
    TAG_AMI_BASE_NAME,
    TAG_CHALLENGE,
    TAG_DEADLINE,
    TAG_EVENT,
    TAG_PREFIX,
    TAG_SUBMISSION,
    challenge_tags,
)

# The dispatcher names every instance after its submission.
TAG_NAME = "Name"


def dispatcher_policy(config: StackConfig, launch_template_arn: str) -> dict:
    """The dispatcher's IAM policy: launch only through the template, only the stack's AMIs
    and instance types, only with the worker tags; terminate only the stack's workers.

    RunInstances authorizes each resource it touches, so the statements split them: the
    instance (type and tags checked), its volume (tags checked), the image (the stack's AMI
    tag) and the rest (subnet, network interface, security group, key pair, the template,
    a spot request), every one only through the template.
    """
    through_template = {"ArnEquals": {"ec2:LaunchTemplate": launch_template_arn}}
    worker_tags = {
        **through_template,
        "StringEquals": {f"aws:RequestTag/{TAG_CHALLENGE}": config.challenge_name},
        "Null": {f"aws:RequestTag/{TAG_EVENT}": "false", f"aws:RequestTag/{TAG_DEADLINE}": "false"},
        "ForAllValues:StringLike": {"aws:TagKeys": [f"{TAG_PREFIX}*", TAG_NAME]},
    }
    arn = f"arn:aws:ec2:{config.region}"
    own_worker = {"StringEquals": {f"aws:ResourceTag/{TAG_CHALLENGE}": config.challenge_name}}
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Describe",
                "Effect": "Allow",
                "Action": [
                    "ec2:DescribeImages",
                    "ec2:DescribeInstances",
                    "ec2:DescribeInstanceStatus",
                    "ec2:DescribeSpotPriceHistory",
                ],
                "Resource": "*",
            },
            {
                "Sid": "LaunchInstance",
                "Effect": "Allow",
                "Action": "ec2:RunInstances",
                "Resource": f"{arn}:*:instance/*",
                "Condition": {
                    **worker_tags,
                    "StringLike": {"ec2:InstanceType": list(config.worker_instance_types)},
                },
            },
            {
                "Sid": "LaunchVolume",
                "Effect": "Allow",
                "Action": "ec2:RunInstances",
                "Resource": f"{arn}:*:volume/*",
                "Condition": worker_tags,
            },
            {
                "Sid": "LaunchStackImage",
                "Effect": "Allow",
                "Action": "ec2:RunInstances",
                "Resource": f"{arn}::image/*",
                "Condition": {
                    **through_template,
                    "StringEquals": {f"aws:ResourceTag/{TAG_AMI_BASE_NAME}": config.ami_base_name},
                },
            },
            {
                "Sid": "LaunchThroughTemplate",
                "Effect": "Allow",
                "Action": "ec2:RunInstances",
                "Resource": [
                    f"{arn}:*:{kind}/*"
                    for kind in (
                        "subnet",
                        "network-interface",
                        "security-group",
                        "key-pair",
                        "launch-template",
                        "spot-instances-request",
                    )
                ],
                "Condition": through_template,
            },
            {
                "Sid": "TagAtLaunch",
                "Effect": "Allow",
                "Action": "ec2:CreateTags",
                "Resource": "*",
                "Condition": {"StringEquals": {"ec2:CreateAction": "RunInstances"}},
            },
            {
                # A reused instance's deadline and submission (and its Name, which shows
                # both) move with each submission it takes; no other tag changes.
                "Sid": "MoveDeadline",
                "Effect": "Allow",
                "Action": "ec2:CreateTags",
                "Resource": f"{arn}:*:instance/*",
                "Condition": {
                    **own_worker,
                    "ForAllValues:StringEquals": {
                        "aws:TagKeys": [TAG_DEADLINE, TAG_SUBMISSION, "Name"]},
                },
            },
            {
                "Sid": "TerminateOwnWorkers",
                "Effect": "Allow",
                "Action": "ec2:TerminateInstances",
                "Resource": f"{arn}:*:instance/*",
                "Condition": own_worker,
            },
            {
                "Sid": "SpotServiceLinkedRole",
                "Effect": "Allow",
                "Action": "iam:CreateServiceLinkedRole",
                "Resource": "*",
                "Condition": {"StringEquals": {"iam:AWSServiceName": "spot.amazonaws.com"}},
            },
        ],
    }


class WorkerLaunch(pulumi.ComponentResource):
    """The launch template every worker starts from, and the dispatcher's managed policy."""

    def __init__(
        self,
        name: str,
        config: StackConfig,
        security_group: aws.ec2.SecurityGroup,
        key_pair: aws.ec2.KeyPair,
        root_device: str,
        opts: pulumi.ResourceOptions | None = None,
    ):
        super().__init__("ramp-runner:infra:WorkerLaunch", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = challenge_tags(config.challenge_name)
        # No image and no instance type: the dispatcher gives the newest AMI of the stack
        # and the event's type at launch (the policy bounds both).
        self.launch_template = aws.ec2.LaunchTemplate(
            f"{name}-template",
            name=f"{config.challenge_name}-ramp-worker",
            description=f"RAMP workers of {config.challenge_name}",
            # IMDSv2 only, and one hop: a container or a forwarded socket on the worker
            # cannot reach the metadata service.
            metadata_options={
                "http_endpoint": "enabled",
                "http_tokens": "required",
                "http_put_response_hop_limit": 1,
            },
            # The root device of the parent image, so this mapping replaces the AMI's root
            # volume rather than adding one: encrypted even from an AMI built unencrypted.
            block_device_mappings=[
                {
                    "device_name": root_device,
                    "ebs": {
                        "encrypted": "true",
                        "volume_type": "gp3",
                        "delete_on_termination": "true",
                    },
                }
            ],
            # A halt on the instance (the heartbeat timer, the self-destruct) terminates it.
            instance_initiated_shutdown_behavior="terminate",
            key_name=key_pair.key_name,
            vpc_security_group_ids=[security_group.id],
            tag_specifications=[
                {"resource_type": kind, "tags": tags} for kind in ("instance", "volume")
            ],
            update_default_version=True,
            tags=tags,
            opts=child,
        )
        self.dispatcher_policy = aws.iam.Policy(
            f"{name}-dispatcher",
            name=f"{config.challenge_name}-ramp-dispatcher",
            description=f"What the ramp-runner dispatcher of {config.challenge_name} may do",
            policy=self.launch_template.arn.apply(
                lambda arn: json.dumps(dispatcher_policy(config, arn))
            ),
            tags=tags,
            opts=child,
        )
        self.register_outputs(
            {
                "launchTemplateId": self.launch_template.id,
                "launchTemplateName": self.launch_template.name,
                "dispatcherPolicyArn": self.dispatcher_policy.arn,
            }
        )
