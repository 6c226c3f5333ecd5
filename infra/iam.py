"""IAM documents the stack's roles share."""

from __future__ import annotations

import json

import pulumi
import pulumi_aws as aws

from .tags import challenge_tags


def assume_role_policy(service: str) -> str:
    """Trust policy letting one AWS service (ec2.amazonaws.com, ...) assume a role."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Service": service},
                    "Action": "sts:AssumeRole",
                }
            ],
        }
    )


def service_role(resource_name: str, service: str, challenge_name: str,
                 opts: pulumi.ResourceOptions) -> aws.iam.Role:
    """A role ``service`` assumes, tagged as the challenge's."""
    return aws.iam.Role(
        resource_name,
        assume_role_policy=assume_role_policy(service),
        tags=challenge_tags(challenge_name),
        opts=opts,
    )
