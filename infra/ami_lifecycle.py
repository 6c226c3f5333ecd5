"""An Image Builder lifecycle policy: the newest AMIs of the stack are kept, older ones deleted."""

from __future__ import annotations

import pulumi
import pulumi_aws as aws

from .iam import service_role
from .stack_config import StackConfig
from .tags import challenge_tags

LIFECYCLE_EXECUTION_POLICY = (
    "arn:aws:iam::aws:policy/service-role/EC2ImageBuilderLifecycleExecutionPolicy"
)


def image_tags(config: StackConfig) -> dict[str, str]:
    """Tags that put an Image Builder image under the stack's lifecycle policy.

    The policy selects images by these tags. Image Builder does not copy a pipeline's tags
    to the images it builds, so whoever starts a build passes them
    (StartImagePipelineExecution's `tags`): the stack exports them as `imageTags`.
    """
    return challenge_tags(config.challenge_name)


class AmiLifecycle(pulumi.ComponentResource):
    """Deletes the images beyond the newest `keepAmis`, with their AMIs and snapshots."""

    def __init__(self, name: str, config: StackConfig, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ramp-runner:infra:AmiLifecycle", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = challenge_tags(config.challenge_name)
        self.role = service_role(f"{name}-role", "imagebuilder.amazonaws.com",
                                 config.challenge_name, child)
        attachment = aws.iam.RolePolicyAttachment(
            f"{name}-execution",
            role=self.role.name,
            policy_arn=LIFECYCLE_EXECUTION_POLICY,
            opts=child,
        )
        self.policy = aws.imagebuilder.LifecyclePolicy(
            f"{name}-policy",
            name=f"{config.challenge_name}-ramp-worker",
            description=f"Keep the newest {config.keep_amis} AMIs of {config.challenge_name}",
            execution_role=self.role.arn,
            resource_type="AMI_IMAGE",
            policy_details=[
                {
                    "action": {
                        "type": "DELETE",
                        # The private test data sits in the snapshots: they go too.
                        "include_resources": {"amis": True, "snapshots": True},
                    },
                    "filter": {"type": "COUNT", "value": config.keep_amis},
                }
            ],
            resource_selection={"tag_map": image_tags(config)},
            status="ENABLED",
            tags=tags,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[attachment]),
        )
        self.register_outputs({"lifecyclePolicyArn": self.policy.arn})
