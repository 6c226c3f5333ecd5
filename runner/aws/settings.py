"""The ``worker_type: aws`` section; light, so that validating a config imports neither
boto3 nor fabric."""

from __future__ import annotations

import dataclasses

from runner.errors import ConfigError
from runner.redaction import secret
from runner.ssh.settings import RemoteWorkerSection

# The self-destruct timer counts from boot: the margin covers boot, upload and collection.
MIN_SELF_DESTRUCT_MARGIN = 600.0


@dataclasses.dataclass(frozen=True)
class AWSWorkerSection(RemoteWorkerSection):
    """``worker_type: aws``: one EC2 instance per submission."""

    region_name: str = ""
    ami_user_name: str = ""
    instance_type: str = ""
    key_name: str = ""
    security_group: str = ""
    key_path: str = ""
    remote_ramp_kit_folder: str = ""
    ami_image_name: str | None = None
    ami_image_id: str | None = None
    use_spot_instance: bool = False
    spot_fallback_on_demand: bool = True
    conda_env: str | None = None
    access_key_id: str | None = secret(default=None)
    secret_access_key: str | None = secret(default=None)
    # ramp-runner additions: credentials profile, boot limits.
    profile_name: str | None = None
    ssh_ready_timeout: float = 600.0
    self_destruct_margin: float = 1800.0

    REQUIRED = (
        "region_name",
        "ami_user_name",
        "instance_type",
        "key_name",
        "security_group",
        "key_path",
        "remote_ramp_kit_folder",
    )

    def check(self, source: str, key_path: str) -> None:
        """Refuse an AMI-less section, impossible limits and half a key pair."""
        super().check(source, key_path)
        if not (self.ami_image_name or self.ami_image_id):
            raise ConfigError(source, f"{key_path}.ami_image_name",
                              "an AMI base name (or ami_image_id)")
        if self.ssh_ready_timeout <= 0:
            raise ConfigError(source, f"{key_path}.ssh_ready_timeout",
                              "a positive number of seconds", repr(self.ssh_ready_timeout))
        if self.self_destruct_margin < MIN_SELF_DESTRUCT_MARGIN:
            raise ConfigError(source, f"{key_path}.self_destruct_margin",
                              f"a number of seconds >= {MIN_SELF_DESTRUCT_MARGIN:g} (boot, "
                              "upload and collection must fit before the instance halts "
                              "itself)", repr(self.self_destruct_margin))
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ConfigError(source, f"{key_path}.access_key_id",
                              "access_key_id and secret_access_key together, or neither")
