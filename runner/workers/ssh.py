"""SSHWorker (``worker_type: ssh``): run submissions on hosts the organiser already has.

Each host runs one submission at a time: a worker waits in ``setup`` until one of the
configured hosts is free. Unknown host keys are trusted on first use and recorded in
the event's known_hosts file (``strict_host_key_checking: true`` refuses them); a
changed key is always refused.
"""

from __future__ import annotations

import logging
import shlex
import threading
from typing import Any

from runner.config import SSHHost, SSHWorkerSection, worker_settings
from runner.remote import CONNECTION_ERRORS, RemoteSession
from runner.workers.remote_worker import (
    KILL_SESSION,
    RUN_FOLDER,
    RemoteWorker,
    known_hosts_path,
)

logger = logging.getLogger("runner.worker")

# Hosts in use by a worker of this process: (user, host, port).
_busy: set[tuple[str, str, int]] = set()
_host_freed = threading.Condition()


def _key(host: SSHHost) -> tuple[str, str, int]:
    return host.user, host.host, host.port


def _section(config: dict[str, Any]) -> SSHWorkerSection:
    return worker_settings("ssh", config, "SSHWorker config")


def _session(host: SSHHost, section: SSHWorkerSection, config: dict[str, Any]) -> RemoteSession:
    return RemoteSession(host.host, host.user, host.key_path, host.port,
                         known_hosts=known_hosts_path(config),
                         strict_host_keys=section.strict_host_key_checking)


class SSHWorker(RemoteWorker):
    """Run a submission on the first free host of ``hosts``."""

    def __init__(self, config: dict[str, Any], submission: str):
        super().__init__(config, submission)
        self.host: SSHHost | None = None

    def _claim_host(self, section: SSHWorkerSection) -> SSHHost:
        with _host_freed:
            while True:
                for host in section.hosts:
                    if _key(host) not in _busy:
                        _busy.add(_key(host))
                        return host
                if self._wakeup.is_set():
                    raise RuntimeError(f"{self!r}: killed while waiting for a free host")
                _host_freed.wait(1.0)

    def _release_host(self) -> None:
        if self.host is not None:
            with _host_freed:
                _busy.discard(_key(self.host))
                _host_freed.notify_all()
            self.host = None

    def setup(self) -> None:
        """Claim a free host, connect, upload; release the host on any failure."""
        section = _section(self.config)
        self.host = self._claim_host(section)
        self.remote_kit = self.host.remote_ramp_kit_folder.rstrip("/")
        self.conda_env, self.path_prefix = self.host.conda_env, section.remote_path_prefix
        try:
            self.session = _session(self.host, section, self.config)
            self.session.connect()
            self._upload()
        except BaseException:
            self._close_session()
            self._release_host()
            raise
        super().setup()

    def teardown(self) -> None:
        """Remove the run's files from the host, close the connection, free the host."""
        try:
            if self.session is not None and self.session.is_connected:
                stale = " ".join(shlex.quote(path) for path in (
                    f"{self.remote_kit}/submissions/{self.submission}", self.run_dir))
                self.session.run(f"rm -rf {stale}", 60)
        except CONNECTION_ERRORS as error:
            logger.warning("%r: could not clean the host: %s", self, error)
        finally:
            self._close_session()
            self._release_host()
        super().teardown()

    @classmethod
    def reap_leftovers(cls, config: dict[str, Any], dry_run: bool = False) -> list[str]:
        """Kill and remove runs a dead dispatcher left on the hosts (not those in use here)."""
        section = _section(config)
        found = []
        for host in section.hosts:
            with _host_freed:
                if _key(host) in _busy:
                    continue
            kit = shlex.quote(host.remote_ramp_kit_folder.rstrip("/"))
            act = "" if dry_run else (
                f'pid=$(cat "$d/pid" 2>/dev/null); {KILL_SESSION}'
                'rm -rf "$d" "../submissions/${d%/}"; ')
            script = (f"cd {kit}/{RUN_FOLDER} 2>/dev/null || exit 0; "
                      f'for d in */; do [ -d "$d" ] || continue; echo "${{d%/}}"; {act}done')
            session = _session(host, section, config)
            try:
                session.connect()
                _, out, _ = session.run(script, 60)
            except CONNECTION_ERRORS as error:
                logger.warning("reap: %s@%s:%d unreachable: %s", host.user, host.host,
                               host.port, error)
                continue
            finally:
                session.close()
            found += [f"{host.host}:{host.port}:{name}" for name in out.split()]
        return found
