"""What the dispatcher needs to reach workers: a security group and a key pair."""

from __future__ import annotations

import ipaddress

import pulumi
import pulumi_aws as aws

from .stack_config import StackConfig
from .tags import challenge_tags


class WorkerAccess(pulumi.ComponentResource):
    """SSH from the configured CIDRs only, and the organiser's public key as an EC2 key pair."""

    def __init__(self, name: str, config: StackConfig, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ramp-runner:infra:WorkerAccess", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        ipv4 = [c for c in config.ssh_cidrs if ipaddress.ip_network(c).version == 4]
        ipv6 = [c for c in config.ssh_cidrs if ipaddress.ip_network(c).version == 6]
        # No vpc_id: the default VPC, where EC2 accepts a security group by name at launch.
        self.security_group = aws.ec2.SecurityGroup(
            f"{name}-ssh",
            name=f"{config.challenge_name}-ramp-workers",
            description=f"SSH to the RAMP workers of {config.challenge_name}",
            ingress=[
                aws.ec2.SecurityGroupIngressArgs(
                    description="SSH from the dispatcher",
                    protocol="tcp",
                    from_port=22,
                    to_port=22,
                    cidr_blocks=ipv4 or None,
                    ipv6_cidr_blocks=ipv6 or None,
                )
            ],
            # The AMI holds the private test data and a submission runs arbitrary code: by
            # default it reaches nothing (replies to the dispatcher's SSH pass anyway, security
            # groups being stateful; the instance metadata and DNS at the VPC resolver are not
            # filtered by security groups). An empty list removes EC2's default allow-all rule.
            egress=(
                [
                    aws.ec2.SecurityGroupEgressArgs(
                        protocol="-1",
                        from_port=0,
                        to_port=0,
                        cidr_blocks=["0.0.0.0/0"],
                        ipv6_cidr_blocks=["::/0"],
                    )
                ]
                if config.worker_egress
                else []
            ),
            tags=challenge_tags(config.challenge_name),
            opts=child,
        )
        self.key_pair = aws.ec2.KeyPair(
            f"{name}-key",
            key_name=config.key_name,
            public_key=config.public_key,
            tags=challenge_tags(config.challenge_name),
            opts=child,
        )
        self.register_outputs(
            {
                "securityGroupId": self.security_group.id,
                "securityGroupName": self.security_group.name,
                "keyName": self.key_pair.key_name,
            }
        )
