"""The reaper: a schedule that runs a Lambda terminating workers past their deadline tag."""

from __future__ import annotations

import json
from pathlib import Path

import pulumi
import pulumi_aws as aws

from . import reaper_lambda
from .iam import service_role
from .stack_config import StackConfig
from .tags import TAG_CHALLENGE, TAG_DEADLINE, challenge_tags

HANDLER_FILE = Path(reaper_lambda.__file__)
# A leaked instance lives at most this long past its deadline (plus one run of the Lambda).
REAPER_INTERVAL_MINUTES = 5
LOG_RETENTION_DAYS = 30


def reaper_policy(challenge: str, log_group_arn: str) -> dict:
    """What the Lambda may do: list instances, terminate the challenge's, write its log."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            # DescribeInstances takes no resource-level condition.
            {"Effect": "Allow", "Action": "ec2:DescribeInstances", "Resource": "*"},
            {
                "Effect": "Allow",
                "Action": "ec2:TerminateInstances",
                "Resource": "*",
                "Condition": {"StringEquals": {f"aws:ResourceTag/{TAG_CHALLENGE}": challenge}},
            },
            {
                "Effect": "Allow",
                "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
                "Resource": f"{log_group_arn}:*",
            },
        ],
    }


class InstanceReaper(pulumi.ComponentResource):
    """EventBridge Scheduler -> Lambda every few minutes, each with a role of its own."""

    def __init__(self, name: str, config: StackConfig, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ramp-runner:infra:InstanceReaper", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = challenge_tags(config.challenge_name)
        function_name = f"{config.challenge_name}-ramp-reaper"
        # Made here rather than by Lambda, so it has a retention and the role needs no
        # logs:CreateLogGroup.
        self.log_group = aws.cloudwatch.LogGroup(
            f"{name}-logs",
            name=f"/aws/lambda/{function_name}",
            retention_in_days=LOG_RETENTION_DAYS,
            tags=tags,
            opts=child,
        )
        self.role = service_role(f"{name}-role", "lambda.amazonaws.com",
                                 config.challenge_name, child)
        role_policy = aws.iam.RolePolicy(
            f"{name}-terminate",
            role=self.role.name,
            policy=self.log_group.arn.apply(
                lambda arn: json.dumps(reaper_policy(config.challenge_name, arn))
            ),
            opts=child,
        )
        self.function = aws.lambda_.Function(
            f"{name}-function",
            name=function_name,
            description=f"Terminate {config.challenge_name}'s RAMP workers past their deadline",
            runtime="python3.12",
            handler=f"{HANDLER_FILE.stem}.handler",
            code=pulumi.AssetArchive({HANDLER_FILE.name: pulumi.FileAsset(str(HANDLER_FILE))}),
            role=self.role.arn,
            timeout=60,
            environment={
                "variables": {
                    "CHALLENGE_TAG": TAG_CHALLENGE,
                    "CHALLENGE_NAME": config.challenge_name,
                    "DEADLINE_TAG": TAG_DEADLINE,
                }
            },
            tags=tags,
            # Its first run must find its permissions and its log group.
            opts=pulumi.ResourceOptions(parent=self, depends_on=[role_policy, self.log_group]),
        )
        self.scheduler_role = service_role(f"{name}-scheduler-role", "scheduler.amazonaws.com",
                                           config.challenge_name, child)
        invoke_policy = aws.iam.RolePolicy(
            f"{name}-invoke",
            role=self.scheduler_role.name,
            policy=self.function.arn.apply(
                lambda arn: json.dumps(
                    {
                        "Version": "2012-10-17",
                        "Statement": [
                            {"Effect": "Allow", "Action": "lambda:InvokeFunction", "Resource": arn}
                        ],
                    }
                )
            ),
            opts=child,
        )
        self.schedule = aws.scheduler.Schedule(
            f"{name}-schedule",
            name=function_name,
            description=f"Run {function_name} every {REAPER_INTERVAL_MINUTES} minutes",
            schedule_expression=f"rate({REAPER_INTERVAL_MINUTES} minutes)",
            flexible_time_window={"mode": "OFF"},
            # A missed run is made up by the next one.
            target={
                "arn": self.function.arn,
                "role_arn": self.scheduler_role.arn,
                "retry_policy": {"maximum_retry_attempts": 0},
            },
            opts=pulumi.ResourceOptions(parent=self, depends_on=[invoke_policy]),
        )
        self.register_outputs(
            {"reaperFunctionName": self.function.name, "reaperSchedule": self.schedule.name}
        )
