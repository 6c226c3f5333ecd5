"""A real PostgreSQL server for tests: Debian's ``postgresql`` package, on loopback.

``initdb`` and ``pg_ctl`` run as the unprivileged ``postgres`` user (PostgreSQL refuses
root); the cluster lives in a fresh folder under /tmp, listens on 127.0.0.1 only, on a
free port, with a password for the RAMP user. A server that cannot start fails the test.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

BIN = Path("/usr/lib/postgresql/15/bin")
SYSTEM_USER = "postgres"
USER, PASSWORD, DATABASE = "mrramp", "mrramp", "databoard_test"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """One throw-away cluster; ``start``/``stop`` may be called again (outage tests)."""

    def __init__(self) -> None:
        if not (BIN / "initdb").exists():
            raise RuntimeError(f"{BIN}/initdb missing: apt-get install postgresql")
        account = pwd.getpwnam(SYSTEM_USER)
        self.root = Path(tempfile.mkdtemp(prefix="ramp-runner-pg-"))
        os.chown(self.root, account.pw_uid, account.pw_gid)
        self.data = self.root / "data"
        self.port = _free_port()
        password_file = self.root / "password"
        password_file.write_text(PASSWORD + "\n")
        os.chown(password_file, account.pw_uid, account.pw_gid)
        self._run(BIN / "initdb", "-D", self.data, "-U", USER, "--auth=scram-sha-256",
                  f"--pwfile={password_file}", "-E", "UTF8", "--locale=C.UTF-8")
        self.start()
        self._run(BIN / "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER,
                  DATABASE, env={"PGPASSWORD": PASSWORD})

    def _run(self, *argv: object, env: dict[str, str] | None = None) -> None:
        command = ["runuser", "-u", SYSTEM_USER, "--", *map(str, argv)]
        completed = subprocess.run(command, capture_output=True, text=True, cwd=self.root,
                                   env={**os.environ, **(env or {})}, check=False)
        if completed.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stdout}"
                               f"{completed.stderr}")

    @property
    def database(self) -> dict:
        """The ``sqlalchemy:`` section of a RAMP database config for this server."""
        return {"drivername": "postgresql", "username": USER, "password": PASSWORD,
                "host": "127.0.0.1", "port": self.port, "database": DATABASE}

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root}"
        self._run(BIN / "pg_ctl", "-D", self.data, "-l", self.root / "server.log",
                  "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast`` disconnects every client, as a restart does)."""
        self._run(BIN / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def close(self) -> None:
        """Stop the server if it runs and delete the cluster."""
        try:
            self.stop("immediate")
        except RuntimeError:
            pass  # already stopped
        shutil.rmtree(self.root, ignore_errors=True)
