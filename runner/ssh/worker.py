"""SSHWorker (``worker_type: ssh``): run submissions on hosts the organiser already has.

Each host runs one submission at a time: a worker waits in ``setup`` until one of the
configured hosts is free. With ``gpus_per_run``, a host runs as many at once as its GPUs
hold (its ``gpus``, else its ``nvidia-smi -L``), each in a place of its own that keeps the
same GPUs run after run. Unknown host keys are trusted on first use and recorded in
the event's known_hosts file (``strict_host_key_checking: true`` refuses them); a
changed key is always refused.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shlex
import tempfile
from pathlib import Path
from typing import IO, Any

from runner import gpus
from runner.errors import ConfigError
from runner.ssh.remote_worker import (
    RUN_FOLDER,
    RemoteWorker,
    check_private_key,
    kill_session,
    known_hosts_path,
    remote_gpus,
    removal_of_words,
)
from runner.ssh.session import CONNECTION_ERRORS, RemoteSession
from runner.ssh.settings import SSHHost, SSHWorkerSection

logger = logging.getLogger("runner.worker")
# What a dead dispatcher's run left on a host, as shell words of the reaping loop below
# (its run folder "$d" under the kit's RUN_FOLDER, and its copy of the submission).
LEFTOVERS = '"$PWD/${d%/}" "$PWD/../submissions/${d%/}"'

# Where hosts are locked while a run uses them: shared by every dispatcher of this user on
# this machine, and released by the kernel when the process holding a lock dies.
HOST_LOCKS_DIR = Path(tempfile.gettempdir()) / f"ramp-runner-hosts-{os.getuid()}"
HOST_WAIT_SECONDS = 0.5


def host_key(host: SSHHost) -> str:
    """How a host is named in lock files and in what ``prepare`` found."""
    return f"{host.user}@{host.host}:{host.port}"


def _lock(name: str, mode: int) -> IO[str] | None:
    HOST_LOCKS_DIR.mkdir(mode=0o700, exist_ok=True)
    handle = open(HOST_LOCKS_DIR / name, "w")  # noqa: SIM115
    try:
        fcntl.flock(handle, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def lock_host(host: SSHHost) -> IO[str] | None:
    """Take the whole of ``host`` (one run, or reaping): the open lock file, or None when a
    run has it or a place of it."""
    return _lock(host_key(host), fcntl.LOCK_EX)


def lock_place(host: SSHHost, place: int) -> list[IO[str]] | None:
    """Take place ``place`` of ``host`` (its GPUs) for one run: the open lock files (the
    host shared with its other places, the place alone), or None when it is taken."""
    shared = _lock(host_key(host), fcntl.LOCK_SH)
    if shared is None:
        return None
    own = _lock(f"{host_key(host)}.place{place}", fcntl.LOCK_EX)
    if own is None:
        shared.close()
        return None
    return [shared, own]


def host_in_use(host: SSHHost) -> bool:
    """Whether a run (of any dispatcher here) holds ``host``."""
    handle = lock_host(host)
    if handle is not None:
        handle.close()
    return handle is None


def _session(host: SSHHost, section: SSHWorkerSection, event_dir: str | None) -> RemoteSession:
    return RemoteSession(host.host, host.user, host.key_path, host.port,
                         known_hosts=known_hosts_path(section, event_dir),
                         strict_host_keys=section.strict_host_key_checking)


class SSHWorker(RemoteWorker):
    """Run a submission on the first free host of ``hosts``."""

    settings_class = SSHWorkerSection

    def __init__(self, config: dict[str, Any], submission: str):
        super().__init__(config, submission)
        self.host: SSHHost | None = None
        self._host_locks: list[IO[str]] = []

    def _claim_host(self) -> None:
        places = self._places() if self.settings.gpus_per_run else None
        while True:
            if places is None:
                for host in self.settings.hosts:
                    lock = lock_host(host)
                    if lock is not None:
                        self.host, self._host_locks = host, [lock]
                        return
            else:
                for host, host_gpus, place in places:
                    locks = lock_place(host, place)
                    if locks is not None:
                        self.host, self._host_locks = host, locks
                        self.gpus = gpus.of_slot(host_gpus, self.settings.gpus_per_run, place)
                        return
            if self._wakeup.wait(HOST_WAIT_SECONDS):
                raise RuntimeError(f"{self!r}: killed while waiting for a free host")

    def _places(self) -> list[tuple[SSHHost, tuple[int, ...], int]]:
        """Every (host, its GPUs, place) of ``gpus_per_run`` GPUs; GPUError when no host
        has that many (waiting would never end)."""
        per_run = self.settings.gpus_per_run
        # What the dispatcher found once (prepare); else asked here.
        found = (self.config.get("prepared") or {}).get("host_gpus") or {}
        places = []
        for host in self.settings.hosts:
            host_gpus = found.get(host_key(host))
            if host_gpus is None:
                host_gpus = self._host_gpus(host)
            places += [(host, host_gpus, place)
                       for place in range(gpus.runs_fit(host_gpus, per_run))]
        if not places:
            raise gpus.GPUError(f"no host has gpus_per_run={per_run} GPU(s)")
        return places

    def _host_gpus(self, host: SSHHost) -> tuple[int, ...]:
        if host.gpus is not None:
            return host.gpus
        session = _session(host, self.settings, self.config.get("event_dir"))
        try:
            session.connect()
            return remote_gpus(session, self.settings.remote_path_prefix)
        finally:
            session.close()

    def _release_host(self) -> None:
        for lock in self._host_locks:
            lock.close()
        self._host_locks = []

    def setup(self) -> None:
        """Claim a free host, connect, upload; release the host on any failure."""
        self._claim_host()
        self.remote_kit = self.host.remote_ramp_kit_folder.rstrip("/")
        self.conda_env, self.path_prefix = self.host.conda_env, self.settings.remote_path_prefix
        try:
            self.session = _session(self.host, self.settings, self.settings.dispatch.event_dir)
            self.session.connect()
            self._upload()
        except BaseException:
            self._close_session()
            self.session = None  # nothing of this run is on the host to clean
            self._release_host()
            raise
        super().setup()

    def release_run(self) -> None:
        """Stop the run if it still goes, remove its files from the host, close the
        connection and free the host, whatever happened before."""
        try:
            if self.session is not None:
                if not self.session.is_connected:
                    # A step past its deadline closed it (a hung poll): one more try.
                    self.session.reconnect()
                self.stop_run()
                self.session.run(self._stale_files(), 60)
        except Exception as error:  # noqa: BLE001 - cleaning is best effort; release anyway
            logger.warning("%r: could not clean the host: %s", self, error)
        finally:
            self._close_session()
            self._release_host()

    @classmethod
    def preflight(cls, config: dict[str, Any]) -> list[str]:
        """Refuse a host whose private key file is missing or readable by others."""
        for index, host in enumerate(cls.settings_of(config).hosts):
            check_private_key(host.key_path, cls.config_source(config),
                              f"worker.hosts[{index}].key_path")
        return []

    @classmethod
    def gpu_hosts(cls, config: dict[str, Any]) -> list[gpus.HostGPUs]:
        """Each host's GPUs: its ``gpus``, else what its nvidia-smi -L lists (asked over
        SSH); ConfigError naming the host when neither gives them."""
        section, source = cls.settings_of(config), cls.config_source(config)
        found = []
        for index, host in enumerate(section.hosts):
            key = f"worker.hosts[{index}].gpus"
            if host.gpus is not None:
                found.append(gpus.HostGPUs(key, host.gpus))
                continue
            session = _session(host, section, config.get("event_dir"))
            try:
                session.connect()
                listed = remote_gpus(session, section.remote_path_prefix)
            except (gpus.GPUError, *CONNECTION_ERRORS) as error:
                raise ConfigError(source, key, "the host's GPU list (gpus: [0, 1]) when its "
                                  "nvidia-smi -L cannot give it", str(error)) from None
            finally:
                session.close()
            found.append(gpus.HostGPUs(f"nvidia-smi -L on {host_key(host)}", listed))
        return found

    @classmethod
    def prepare(cls, config: dict[str, Any]) -> dict[str, Any]:
        """With ``gpus_per_run``, each host's GPUs, found once per dispatcher."""
        if not cls.settings_of(config).gpus_per_run:
            return {}
        section = cls.settings_of(config)
        return {"host_gpus": {host_key(host): found.gpus for host, found
                              in zip(section.hosts, cls.gpu_hosts(config), strict=True)}}

    @classmethod
    def reap_leftovers(cls, config: dict[str, Any], dry_run: bool = False) -> list[str]:
        """Kill and remove runs a dead dispatcher left on the hosts (not those in use)."""
        section = cls.settings_of(config)
        found = []
        for host in section.hosts:
            lock = lock_host(host)
            if lock is None:
                continue
            kit = shlex.quote(host.remote_ramp_kit_folder.rstrip("/"))
            # A run user's files are removed as root.
            sudo = "sudo -n " if section.run_as_user else ""
            act = "" if dry_run else (
                f'pid=$(cat "$d/pid" 2>/dev/null); {kill_session(section.run_as_user)}'
                f"{sudo}{removal_of_words(LEFTOVERS)}; ")
            script = (f"cd {kit}/{RUN_FOLDER} 2>/dev/null || exit 0; "
                      f'for d in */; do [ -d "$d" ] || continue; echo "${{d%/}}"; {act}done')
            session = _session(host, section, section.dispatch.event_dir)
            try:
                session.connect()
                _, out, _ = session.run(script, 60)
            except CONNECTION_ERRORS as error:
                logger.warning("reap: %s@%s:%d unreachable: %s", host.user, host.host,
                               host.port, error)
                continue
            finally:
                session.close()
                lock.close()
            found += [f"{host.host}:{host.port}:{name}" for name in out.split()]
        return found
