"""The sections of workers that run on hosts over SSH; light, so that validating a config
imports neither fabric nor paramiko."""

from __future__ import annotations

import dataclasses
import re

from runner.config import WorkerSection, check_gpu_list
from runner.errors import ConfigError

# A portable user name (POSIX, as useradd accepts by default); also safe as a shell word.
USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


@dataclasses.dataclass(frozen=True)
class RemoteWorkerSection(WorkerSection):
    """Keys every worker that runs ramp-test on a host over SSH shares."""

    memory_profiling: bool = False
    known_hosts_file: str | None = None
    remote_path_prefix: str | None = None
    # The host user the run executes as (its supervisor and ramp-test), through
    # ``sudo -n -u``: a user without sudo, so that a run outside the sandbox cannot reach
    # the login user's rights. None: the run executes as the login user.
    run_as_user: str | None = None

    def check(self, source: str, key_path: str) -> None:
        """Refuse a run user that cannot be a POSIX user name."""
        super().check(source, key_path)
        if self.run_as_user is not None and not USER_NAME.fullmatch(self.run_as_user):
            raise ConfigError(source, f"{key_path}.run_as_user",
                              "a user name of the host (letters, digits, '_', '-'; not "
                              "starting with '-'), or null", repr(self.run_as_user))


@dataclasses.dataclass(frozen=True)
class SSHHost:
    """One host an SSH worker may run a submission on."""

    host: str
    user: str
    key_path: str
    remote_ramp_kit_folder: str
    port: int = 22
    conda_env: str | None = None
    # The host's GPUs (nvidia-smi -L numbering); None: as the host's nvidia-smi -L lists them.
    gpus: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class SSHWorkerSection(RemoteWorkerSection):
    """``worker_type: ssh``: hosts the organiser already has, one submission per host."""

    hosts: tuple[SSHHost, ...] = ()
    strict_host_key_checking: bool = False

    REQUIRED = ("hosts",)

    def check(self, source: str, key_path: str) -> None:
        """Refuse a host listed twice (it would run two submissions at once) and a host
        GPU list that cannot be one."""
        super().check(source, key_path)
        seen = [(h.host, h.port) for h in self.hosts]
        if len(set(seen)) != len(seen):
            raise ConfigError(source, f"{key_path}.hosts", "each host:port listed once")
        for index, host in enumerate(self.hosts):
            check_gpu_list(host.gpus, self.gpus_per_run, source,
                           f"{key_path}.hosts[{index}].gpus")
