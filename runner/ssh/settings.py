"""The sections of workers that run on hosts over SSH; light, so that validating a config
imports neither fabric nor paramiko."""

from __future__ import annotations

import dataclasses

from runner.config import WorkerSection, check_gpu_list
from runner.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class RemoteWorkerSection(WorkerSection):
    """Keys every worker that runs ramp-test on a host over SSH shares."""

    memory_profiling: bool = False
    known_hosts_file: str | None = None
    remote_path_prefix: str | None = None


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
