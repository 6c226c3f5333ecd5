"""SSM SecureString parameters holding the credentials of the private data source."""

from __future__ import annotations

import pulumi
import pulumi_aws as aws

from .stack_config import StackConfig


def parameter_name(config: StackConfig, key: str) -> str:
    """SSM name of one secret, known before deployment so recipes can refer to it."""
    return f"/ramp-runner/{config.challenge_name}/{key}"


class DataSecrets(pulumi.ComponentResource):
    """The OSF credentials as SecureStrings; the AMI build reads them by name at build time."""

    def __init__(self, name: str, config: StackConfig, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ramp-runner:infra:DataSecrets", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.parameters: dict[str, aws.ssm.Parameter] = {}
        if config.data_source == "osf":
            for key, value in (
                ("osf-username", config.osf_username),
                ("osf-password", config.osf_password),
            ):
                self.parameters[key] = aws.ssm.Parameter(
                    f"{name}-{key}",
                    name=parameter_name(config, key),
                    type="SecureString",
                    value=value,
                    description=f"{key} for the private data of {config.challenge_name}",
                    opts=child,
                )
        self.names = {key: parameter_name(config, key) for key in self.parameters}
        self.arns = [parameter.arn for parameter in self.parameters.values()]
        self.register_outputs({"names": self.names})
