"""The Image Builder pipeline that bakes the worker AMI from the documents of ami/."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pulumi
import pulumi_aws as aws

from .ami_documents import DOCUMENTS_DIR, ComponentDocument, load_document
from .iam import service_role
from .stack_config import BUILD_DATE_SUFFIX, StackConfig
from .tags import TAG_AMI_BASE_NAME, challenge_tags
from .versions import content_version
from .worker_contract import HEARTBEAT_FILE, HEARTBEAT_TIMEOUT_SECONDS, RUN_USER

SSM_CORE_POLICY = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
IMAGE_BUILDER_POLICY = "arn:aws:iam::aws:policy/EC2InstanceProfileForImageBuilder"


def ami_name_pattern(base_name: str) -> str:
    """AMI name given by the distribution: base name + Image Builder's build date."""
    return f"{base_name}{BUILD_DATE_SUFFIX}"


def build_log_group(config: StackConfig) -> str:
    """CloudWatch log group of the builds: Image Builder names it after the image (recipe)."""
    return f"/aws/imagebuilder/{config.challenge_name}-ramp-worker"


def log_prefix(config: StackConfig) -> str:
    """Key prefix of the build logs in the optional log bucket."""
    return f"imagebuilder/{config.challenge_name}"


def resolve_parent_image(parent_image: str) -> tuple[str, str]:
    """The recipe's parent image and root device name, from an AMI id or an SSM parameter name.

    A parameter is given to Image Builder as `ssm:<name>`, which it resolves when each build
    starts (CreateImageRecipe's parentImage; terraform-provider-aws issue 44161), so a new
    Canonical release changes no recipe. The current AMI is read only for its root device
    name, which stays the same from one release to the next.
    """
    if parent_image.startswith("ami-"):
        image_id, recipe_parent = parent_image, parent_image
    else:
        image_id = aws.ssm.get_parameter(name=parent_image).value
        recipe_parent = f"ssm:{parent_image}"
    image = aws.ec2.get_ami(filters=[{"name": "image-id", "values": [image_id]}])
    return recipe_parent, image.root_device_name


def existing_component(name: str, version: str) -> str | None:
    """Build-version ARN of this account's component `name` at `version`, if it exists."""
    found = aws.imagebuilder.get_components(
        owner="Self",
        filters=[{"name": "name", "values": [name]}, {"name": "version", "values": [version]}],
    )
    for arn in found.arns or []:
        # ListComponents gives version ARNs (.../name/1.2.3); the resource ID is a build
        # version's, and a version this stack creates has exactly one build, the first.
        return arn if arn.count("/") == 3 else f"{arn}/1"
    return None


def worker_parameters(config: StackConfig, secret_names: Mapping[str, str]) -> dict[str, str]:
    """Values of the ramp-worker document's parameters (AWSTOE rejects empty values)."""
    return {
        "ChallengeName": config.challenge_name,
        "KitRepository": config.kit_repository,
        "KitRef": config.kit_ref,
        "InstanceUser": config.instance_user,
        "DataSource": config.data_source,
        "DataS3Uri": config.data_s3_uri or "none",
        "OsfUsernameParameter": secret_names.get("osf-username", "none"),
        "OsfPasswordParameter": secret_names.get("osf-password", "none"),
        "AwsRegion": config.region,
    }


def guard_parameters(config: StackConfig) -> dict[str, str]:
    """Values of the worker-guard document's parameters: the contract of worker_contract.py."""
    return {
        "InstanceUser": config.instance_user,
        "RunUser": RUN_USER,
        "HeartbeatFile": HEARTBEAT_FILE,
        "HeartbeatTimeout": str(HEARTBEAT_TIMEOUT_SECONDS),
    }


def recipe_arguments(config: StackConfig, parent_image: str, root_device: str) -> dict:
    """Every ImageRecipe argument but its components, version and tags.

    Image Builder has no UpdateImageRecipe: a change to any of these replaces the recipe,
    and a replacement under the same name and version is refused. So the recipe version is
    a hash of all of them (and of the components' versions and parameters); only tags,
    which are updated in place, stay out.
    """
    return {
        "name": f"{config.challenge_name}-ramp-worker",
        "description": f"RAMP worker for {config.challenge_name}",
        "parent_image": parent_image,
        "block_device_mappings": [
            {
                "device_name": root_device,
                "ebs": {
                    "volume_size": config.volume_size,
                    "volume_type": "gp3",
                    "delete_on_termination": "true",
                    # The AMI holds the private test data: its snapshot is encrypted (with
                    # the account's default EBS key), and so is every worker's volume.
                    "encrypted": "true",
                },
            }
        ],
    }


class AmiPipeline(pulumi.ComponentResource):
    """Components, recipe, build role, infrastructure, distribution and a manual pipeline."""

    def __init__(
        self,
        name: str,
        config: StackConfig,
        secret_names: Mapping[str, str],
        secret_arns: list[pulumi.Output[str]],
        documents_dir: Path = DOCUMENTS_DIR,
        opts: pulumi.ResourceOptions | None = None,
    ):
        super().__init__("ramp-runner:infra:AmiPipeline", name, None, opts)
        self._name = name
        self._child = pulumi.ResourceOptions(parent=self)
        tags = challenge_tags(config.challenge_name)

        # The guard's test phase, which disarms the heartbeat timer on the test instance,
        # must come before ramp-worker's, which outlasts the timeout.
        specs = [
            ("worker-guard", guard_parameters(config)),
            ("ramp-worker", worker_parameters(config, secret_names)),
        ]
        if config.gpu_drivers:
            # Drivers first: the worker's test phase may then see the GPU, and the timer is
            # enabled after the drivers' reboot.
            specs.insert(0, ("gpu-drivers", {"DriverVersion": config.gpu_driver_version}))
        documents = [
            (load_document(documents_dir / f"{stem}.yml"), values) for stem, values in specs
        ]
        self.components = [self._component(config, document, tags) for document, _ in documents]
        parent_image, self.root_device = resolve_parent_image(config.parent_image)
        arguments = recipe_arguments(config, parent_image, self.root_device)
        self.recipe_version = content_version(
            [document.version for document, _ in documents],
            [values for _, values in documents],
            arguments,
        )
        self.recipe = aws.imagebuilder.ImageRecipe(
            f"{name}-recipe",
            version=self.recipe_version,
            components=[
                {
                    "component_arn": component.arn,
                    "parameters": [{"name": k, "value": v} for k, v in values.items()],
                }
                for component, (_, values) in zip(self.components, documents, strict=True)
            ],
            **arguments,
            tags=tags,
            # Create the new version, move the pipeline to it, then delete the old one: the
            # explicit name makes the provider ask for delete-before-replace, which Image
            # Builder refuses while the pipeline uses the recipe (ResourceDependencyException,
            # terraform-provider-aws issues 39985 and 40128). A defined `False` overrides it.
            opts=pulumi.ResourceOptions(parent=self, delete_before_replace=False),
        )
        self.role, self.instance_profile, attachments = self._build_role(config, secret_arns)
        self.infrastructure = aws.imagebuilder.InfrastructureConfiguration(
            f"{name}-infrastructure",
            name=f"{config.challenge_name}-ramp-worker",
            instance_profile_name=self.instance_profile.name,
            instance_types=list(config.instance_types),
            terminate_instance_on_failure=True,
            instance_metadata_options={"http_tokens": "required", "http_put_response_hop_limit": 2},
            logging=(
                {
                    "s3_logs": {
                        "s3_bucket_name": config.log_bucket,
                        "s3_key_prefix": log_prefix(config),
                    }
                }
                if config.log_bucket
                else None
            ),
            resource_tags=tags,
            tags=tags,
            # A build started before the policies are attached could not reach SSM.
            opts=pulumi.ResourceOptions(parent=self, depends_on=attachments),
        )
        self.distribution = aws.imagebuilder.DistributionConfiguration(
            f"{name}-distribution",
            name=f"{config.challenge_name}-ramp-worker",
            distributions=[
                {
                    "region": config.region,
                    "ami_distribution_configuration": {
                        "name": ami_name_pattern(config.ami_base_name),
                        "ami_tags": {**tags, TAG_AMI_BASE_NAME: config.ami_base_name},
                    },
                }
            ],
            tags=tags,
            opts=self._child,
        )
        # No schedule: the pipeline runs when `invoke build-ami` starts it.
        self.pipeline = aws.imagebuilder.ImagePipeline(
            f"{name}-pipeline",
            name=f"{config.challenge_name}-ramp-worker",
            image_recipe_arn=self.recipe.arn,
            infrastructure_configuration_arn=self.infrastructure.arn,
            distribution_configuration_arn=self.distribution.arn,
            image_tests_configuration={"image_tests_enabled": True, "timeout_minutes": 120},
            enhanced_image_metadata_enabled=True,
            status="ENABLED",
            tags=tags,
            opts=self._child,
        )
        self.register_outputs(
            {"pipelineArn": self.pipeline.arn, "recipeVersion": self.recipe_version}
        )

    def _component(
        self, config: StackConfig, document: ComponentDocument, tags: dict[str, str]
    ) -> aws.imagebuilder.Component:
        """One resource per version of a document, adopted when the account already has it.

        Versions stay in the account when the stack lets go of them (images built from them
        refer to them), and CreateComponent refuses an existing name and version: after a
        revert (A -> B -> A) or a destroy and up, the version is imported instead. A logical
        name per version keeps a reverted version apart from the one in the state.
        """
        name = f"{config.challenge_name}-{document.name}"
        return aws.imagebuilder.Component(
            f"{self._name}-{document.name}-{document.version}",
            name=name,
            platform="Linux",
            version=document.version,
            data=document.text,
            description=document.content.get("description"),
            tags=tags,
            # retain_on_delete, not the provider's skip_destroy: the engine option is not a
            # resource input, so an import compares equal to what the API reads back.
            opts=pulumi.ResourceOptions(
                parent=self,
                retain_on_delete=True,
                import_=existing_component(name, document.version),
            ),
        )

    def _build_role(
        self, config: StackConfig, secret_arns: list[pulumi.Output[str]]
    ) -> tuple[aws.iam.Role, aws.iam.InstanceProfile, list[pulumi.Resource]]:
        """Role of the build instance: SSM core, Image Builder, and only the data it needs."""
        name = self._name
        role = service_role(f"{name}-build-role", "ec2.amazonaws.com", config.challenge_name,
                            self._child)
        attachments: list[pulumi.Resource] = [
            aws.iam.RolePolicyAttachment(
                f"{name}-build-{suffix}", role=role.name, policy_arn=arn, opts=self._child
            )
            for suffix, arn in (
                ("ssm-core", SSM_CORE_POLICY),
                ("imagebuilder", IMAGE_BUILDER_POLICY),
            )
        ]
        statements = _data_statements(config, secret_arns)
        if statements is not None:
            attachments.append(
                aws.iam.RolePolicy(
                    f"{name}-build-data",
                    role=role.name,
                    policy=statements.apply(
                        lambda s: json.dumps({"Version": "2012-10-17", "Statement": s})
                    ),
                    opts=self._child,
                )
            )
        profile = aws.iam.InstanceProfile(f"{name}-build-profile", role=role.name, opts=self._child)
        return role, profile, attachments


def _data_statements(
    config: StackConfig, secret_arns: list[pulumi.Output[str]]
) -> pulumi.Output[list[dict]] | None:
    """IAM statements to read the private data: the data prefix or the secret parameters."""
    statements: list[dict] = []
    if config.data_source == "s3":
        bucket = f"arn:aws:s3:::{config.data_bucket}"
        statements += [
            {
                "Effect": "Allow",
                "Action": "s3:ListBucket",
                "Resource": bucket,
                "Condition": {"StringLike": {"s3:prefix": [f"{config.data_prefix}/*"]}},
            },
            {
                "Effect": "Allow",
                "Action": "s3:GetObject",
                "Resource": f"{bucket}/{config.data_prefix}/*",
            },
        ]
    if config.log_bucket:
        statements.append(
            {
                "Effect": "Allow",
                "Action": "s3:PutObject",
                "Resource": f"arn:aws:s3:::{config.log_bucket}/{log_prefix(config)}/*",
            }
        )
    if not statements and not secret_arns:
        return None
    return pulumi.Output.all(*secret_arns).apply(
        lambda arns: (
            statements
            + (
                [{"Effect": "Allow", "Action": "ssm:GetParameter", "Resource": list(arns)}]
                if arns
                else []
            )
        )
    )
