"""The ``worker_type: aws`` section; light, so that validating a config imports neither
boto3 nor fabric."""

from __future__ import annotations

import dataclasses
from typing import Literal

from runner.errors import ConfigError
from runner.redaction import secret
from runner.ssh.settings import RemoteWorkerSection

# The self-destruct timer counts from boot: the margin covers boot, upload and collection.
MIN_SELF_DESTRUCT_MARGIN = 600.0
# The AMI halts an instance ten minutes after the last heartbeat (a poll): a warm instance
# waits idle without one, so it must be taken again or terminated well before that.
MAX_IDLE_MINUTES = 5.0


@dataclasses.dataclass(frozen=True)
class ReuseInstances:
    """``reuse_instances``: an instance serves up to ``max_runs`` submissions, one after
    the other, and is terminated once it waited ``idle_minutes`` for the next."""

    max_runs: int = 5
    idle_minutes: float = 3.0

    @property
    def idle_seconds(self) -> float:
        """``idle_minutes`` in seconds."""
        return self.idle_minutes * 60


@dataclasses.dataclass(frozen=True)
class InstancePrice:
    """One entry of ``prices``: what an hour of an on-demand instance type costs."""

    instance_type: str
    usd_per_hour: float


@dataclasses.dataclass(frozen=True)
class AWSWorkerSection(RemoteWorkerSection):
    """``worker_type: aws``: one EC2 instance per submission."""

    # Two walls between a run and the instance user's passwordless sudo (which could cancel
    # the self-destruct): the sandbox, and the run user below.
    sandbox: Literal["auto", "required", "off"] = "required"
    # The AMI's user without sudo (ami/worker-guard.yml): the run cannot reach the instance
    # user's sudo, nor cancel the heartbeat halt, even outside the sandbox.
    run_as_user: str | None = "ramp-run"

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
    # The stack's outputs (``aws-config`` writes them): the launch template every launch
    # goes through, and the challenge tag its dispatcher policy asks for.
    launch_template_id: str | None = None
    challenge_name: str | None = None
    # Cost: past ``budget_usd`` (estimated, summed over the event) no instance is launched;
    # on-demand hours are priced from ``prices``, spot hours from EC2's price history.
    budget_usd: float | None = None
    prices: tuple[InstancePrice, ...] = ()
    # Off by default: each submission on an instance of its own.
    reuse_instances: ReuseInstances | None = None

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
        if self.budget_usd is not None and self.budget_usd < 0:
            raise ConfigError(source, f"{key_path}.budget_usd", "a number of dollars >= 0",
                              repr(self.budget_usd))
        if self.budget_usd is not None and self.price_per_hour(self.instance_type) is None:
            # Without a price the budget could not count the on-demand runs.
            raise ConfigError(source, f"{key_path}.prices",
                              f"an entry for instance_type {self.instance_type!r} (its "
                              "on-demand price per hour) when budget_usd is set",
                              repr([p.instance_type for p in self.prices]))
        for index, price in enumerate(self.prices):
            if price.usd_per_hour < 0:
                raise ConfigError(source, f"{key_path}.prices[{index}].usd_per_hour",
                                  "a number of dollars >= 0", repr(price.usd_per_hour))
        if self.reuse_instances is not None:
            self._check_reuse(source, f"{key_path}.reuse_instances")
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ConfigError(source, f"{key_path}.access_key_id",
                              "access_key_id and secret_access_key together, or neither")

    def _check_reuse(self, source: str, key_path: str) -> None:
        reuse = self.reuse_instances
        if self.sandbox != "required":
            # Only the sandbox keeps a run from leaving processes or files for the next
            # submission on the same instance (or from reaching the user's sudo).
            raise ConfigError(source, key_path, "reuse_instances only with sandbox: required "
                              "(runs share an instance only when each is confined)",
                              f"sandbox: {self.sandbox}")
        if reuse.max_runs < 1:
            raise ConfigError(source, f"{key_path}.max_runs", "an integer >= 1",
                              repr(reuse.max_runs))
        if not 0 < reuse.idle_minutes <= MAX_IDLE_MINUTES:
            raise ConfigError(source, f"{key_path}.idle_minutes",
                              f"a number of minutes > 0 and <= {MAX_IDLE_MINUTES:g} (the AMI "
                              "halts an instance ten minutes after its last heartbeat)",
                              repr(reuse.idle_minutes))

    def price_per_hour(self, instance_type: str) -> float | None:
        """The on-demand price of ``instance_type`` from ``prices``, or None."""
        return next((p.usd_per_hour for p in self.prices if p.instance_type == instance_type),
                    None)
