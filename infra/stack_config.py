"""Stack configuration: camelCase Pulumi config read and checked into a frozen dataclass."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

import pulumi

UBUNTU_2204_PARAMETER = (
    "/aws/service/canonical/ubuntu/server/22.04/stable/current/amd64/hvm/ebs-gp2/ami-id"
)
DATA_SOURCES = ("none", "s3", "osf")
PLAIN_KEYS = (
    "challengeName",
    "kitRepository",
    "kitRef",
    "dataSource",
    "dataBucket",
    "dataPrefix",
    "parentImage",
    "instanceTypes",
    "volumeSize",
    "gpuDrivers",
    "gpuDriverVersion",
    "amiBaseName",
    "sshCidrs",
    "allowSshFromAnywhere",
    "allowWorkerEgress",
    "publicKey",
    "keyName",
    "instanceUser",
    "logBucket",
    "workerInstanceTypes",
    "keepAmis",
)
SECRET_KEYS = ("osfUsername", "osfPassword")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,38}[a-z0-9]$")
# The distribution names AMIs <amiBaseName><BUILD_DATE_SUFFIX>. Image Builder's
# AmiNameString (its service model) allows 1-127 characters of letters, digits, -_.:{}
# and spaces; EC2's RegisterImage refuses ':', and braces would be read as dynamic tags:
# the base name keeps to what both accept, with room left for the suffix.
BUILD_DATE_SUFFIX = "-{{ imagebuilder:buildDate }}"
AMI_NAME_MAX = 127
AMI_BASE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
# An EC2 instance type, or an IAM StringLike pattern of them (g5.*): the dispatcher policy's
# ec2:InstanceType condition takes either. The family starts with a letter, so no pattern
# (*.*) allows every type.
INSTANCE_TYPE_PATTERN = re.compile(r"^[a-z][a-z0-9*?-]*\.[a-z0-9*?-]+$")
PUBLIC_KEY_PATTERN = re.compile(r"^(ssh-rsa|ssh-ed25519) [A-Za-z0-9+/=]+( .*)?$")


class StackConfigError(ValueError):
    """A stack config value is missing or invalid; the message starts with the key."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"config key '{key}': {problem}")
        self.key = key


@dataclass(frozen=True)
class StackConfig:
    """Everything the program needs, validated. Secrets stay Pulumi Outputs."""

    region: str
    challenge_name: str
    kit_repository: str
    kit_ref: str
    data_source: str
    data_bucket: str | None
    data_prefix: str
    parent_image: str
    instance_types: tuple[str, ...]
    volume_size: int
    gpu_drivers: bool
    gpu_driver_version: str
    ami_base_name: str
    ssh_cidrs: tuple[str, ...]
    worker_egress: bool
    public_key: str
    key_name: str
    instance_user: str
    log_bucket: str | None
    worker_instance_types: tuple[str, ...]
    keep_amis: int
    osf_username: pulumi.Output[str] | None = None
    osf_password: pulumi.Output[str] | None = None

    @property
    def remote_kit_folder(self) -> str:
        """Where the AMI documents put the kit (home of the instance user)."""
        return f"/home/{self.instance_user}/ramp-kits/{self.challenge_name}"

    @property
    def data_s3_uri(self) -> str | None:
        """s3:// URI of the private data when dataSource is s3."""
        if self.data_source != "s3":
            return None
        return f"s3://{self.data_bucket}/{self.data_prefix}".rstrip("/") + "/"


def read_stack_config() -> StackConfig:
    """Read the current stack's config (project namespace + aws:region)."""
    config = pulumi.Config()
    raw = {key: config.get(key) for key in PLAIN_KEYS}
    secrets = {key: config.get_secret(key) for key in SECRET_KEYS}
    region = pulumi.Config("aws").get("region")
    if not region:
        raise StackConfigError("aws:region", "required (pulumi config set aws:region eu-west-1)")
    return parse_stack_config(raw, secrets, region)


def parse_stack_config(
    raw: Mapping[str, str | None],
    secrets: Mapping[str, pulumi.Output[str] | None],
    region: str,
) -> StackConfig:
    """Validate raw config strings (lists as JSON, as Pulumi stores them)."""
    challenge = _required(raw, "challengeName")
    if not NAME_PATTERN.match(challenge):
        raise StackConfigError(
            "challengeName", "2-40 lower-case letters, digits or '-' (it names AWS resources)"
        )
    if challenge.startswith("sg-"):
        # It starts the security group's name, and EC2 refuses names starting with sg-
        # (which the runner would take for a group id).
        raise StackConfigError("challengeName", f"must not start with 'sg-': {challenge!r}")
    data_source = raw.get("dataSource") or "none"
    if data_source not in DATA_SOURCES:
        raise StackConfigError(
            "dataSource", f"one of {', '.join(DATA_SOURCES)}, not {data_source!r}"
        )
    data_bucket = raw.get("dataBucket")
    if data_source == "s3" and not data_bucket:
        raise StackConfigError("dataBucket", "required when dataSource is s3")
    if data_source == "osf":
        for key in SECRET_KEYS:
            if secrets.get(key) is None:
                raise StackConfigError(
                    key, f"required when dataSource is osf (pulumi config set --secret {key} ...)"
                )
    instance_user = raw.get("instanceUser") or "ubuntu"
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", instance_user):
        raise StackConfigError("instanceUser", f"not a valid Linux user name: {instance_user!r}")
    return StackConfig(
        region=region,
        challenge_name=challenge,
        kit_repository=raw.get("kitRepository") or f"https://github.com/ramp-kits/{challenge}.git",
        kit_ref=raw.get("kitRef") or "HEAD",
        data_source=data_source,
        data_bucket=data_bucket,
        data_prefix=(raw.get("dataPrefix") or challenge).strip("/"),
        parent_image=raw.get("parentImage") or UBUNTU_2204_PARAMETER,
        instance_types=_instance_types(raw),
        volume_size=_volume_size(raw),
        gpu_drivers=_boolean(raw, "gpuDrivers"),
        gpu_driver_version=_gpu_driver_version(raw),
        ami_base_name=_ami_base_name(raw, challenge),
        ssh_cidrs=_ssh_cidrs(raw),
        worker_egress=_boolean(raw, "allowWorkerEgress"),
        public_key=_public_key(raw),
        key_name=raw.get("keyName") or f"{challenge}-ramp-worker",
        instance_user=instance_user,
        log_bucket=raw.get("logBucket"),
        worker_instance_types=_worker_instance_types(raw),
        keep_amis=_keep_amis(raw),
        osf_username=secrets.get("osfUsername") if data_source == "osf" else None,
        osf_password=secrets.get("osfPassword") if data_source == "osf" else None,
    )


def _required(raw: Mapping[str, str | None], key: str) -> str:
    value = raw.get(key)
    if not value:
        raise StackConfigError(key, "required")
    return value


def _boolean(raw: Mapping[str, str | None], key: str) -> bool:
    value = (raw.get(key) or "false").lower()
    if value not in ("true", "false"):
        raise StackConfigError(key, f"true or false, not {raw.get(key)!r}")
    return value == "true"


def _string_list(raw: Mapping[str, str | None], key: str) -> list[str] | None:
    value = raw.get(key)
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        # `pulumi config set key a,b` stores a plain string; accept that spelling too.
        parsed = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
        raise StackConfigError(key, "a list of strings")
    return parsed


def _instance_types(raw: Mapping[str, str | None]) -> tuple[str, ...]:
    types = _string_list(raw, "instanceTypes")
    if types is None:
        return ("m5.large",)
    if not types:
        raise StackConfigError("instanceTypes", "at least one instance type")
    return tuple(types)


def _worker_instance_types(raw: Mapping[str, str | None]) -> tuple[str, ...]:
    # By default the types the AMI was built and tested on.
    types = _string_list(raw, "workerInstanceTypes")
    if types is None:
        return _instance_types(raw)
    if not types:
        raise StackConfigError("workerInstanceTypes", "at least one instance type")
    for instance_type in types:
        if not INSTANCE_TYPE_PATTERN.match(instance_type):
            raise StackConfigError(
                "workerInstanceTypes",
                f"an instance type such as t3.large, or a pattern such as g5.*, "
                f"not {instance_type!r}",
            )
    return tuple(types)


def _keep_amis(raw: Mapping[str, str | None]) -> int:
    value = raw.get("keepAmis") or "3"
    try:
        count = int(value)
    except ValueError:
        raise StackConfigError("keepAmis", f"a number of AMIs, not {value!r}") from None
    # Image Builder's lifecycle COUNT filter takes 1-1000.
    if not 1 <= count <= 1000:
        raise StackConfigError("keepAmis", f"between 1 and 1000, not {count}")
    return count


def _volume_size(raw: Mapping[str, str | None]) -> int:
    value = raw.get("volumeSize") or "30"
    try:
        size = int(value)
    except ValueError:
        raise StackConfigError("volumeSize", f"an integer number of GiB, not {value!r}") from None
    if not 8 <= size <= 16384:
        raise StackConfigError("volumeSize", f"between 8 and 16384 GiB, not {size}")
    return size


def _gpu_driver_version(raw: Mapping[str, str | None]) -> str:
    version = raw.get("gpuDriverVersion") or "535-server"
    # It ends up in Ubuntu package names inside a build script.
    if not re.fullmatch(r"[0-9]{3}(-server)?(-open)?", version):
        raise StackConfigError(
            "gpuDriverVersion", f"a driver branch such as 535-server or 550, not {version!r}"
        )
    return version


def _ami_base_name(raw: Mapping[str, str | None], challenge: str) -> str:
    name = raw.get("amiBaseName") or f"{challenge}-ramp-worker"
    longest = AMI_NAME_MAX - len(BUILD_DATE_SUFFIX)
    if len(name) > longest or not AMI_BASE_NAME_PATTERN.match(name):
        raise StackConfigError(
            "amiBaseName",
            f"1-{longest} letters, digits, '-', '_' or '.', not starting with '.' "
            f"(Image Builder's AMI name rules, with {BUILD_DATE_SUFFIX!r} appended), "
            f"not {name!r}",
        )
    return name


def _ssh_cidrs(raw: Mapping[str, str | None]) -> tuple[str, ...]:
    cidrs = _string_list(raw, "sshCidrs")
    if not cidrs:
        raise StackConfigError(
            "sshCidrs", 'required: the CIDRs the dispatcher connects from, e.g. ["203.0.113.7/32"]'
        )
    anywhere = _boolean(raw, "allowSshFromAnywhere")
    for cidr in cidrs:
        try:
            network = ipaddress.ip_network(cidr, strict=True)
        except ValueError as error:
            raise StackConfigError("sshCidrs", f"{cidr!r} is not a CIDR ({error})") from None
        if network.prefixlen == 0 and not anywhere:
            raise StackConfigError(
                "sshCidrs", f"{cidr} opens SSH to the internet; set allowSshFromAnywhere: true"
            )
    return tuple(cidrs)


def _public_key(raw: Mapping[str, str | None]) -> str:
    key = _required(raw, "publicKey").strip()
    if not PUBLIC_KEY_PATTERN.match(key):
        raise StackConfigError(
            "publicKey", "an OpenSSH ssh-rsa or ssh-ed25519 public key (the .pub file's content)"
        )
    return key
