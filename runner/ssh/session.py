"""One SSH session to one host (fabric): commands, tar streams both ways, host keys.

Everything a run needs goes through a single SSH connection: each step is one channel
on it (one round trip), and files move as one compressed tar stream per direction.
Host keys are checked against a known_hosts file of the event; a host not in it is
trusted on first use (and recorded, with its fingerprint logged), unless ``strict``.

Every step has a deadline of its own. Connecting is bounded by paramiko's connect,
banner and auth timeouts; on an established connection paramiko bounds nothing that
matters: ``Transport.open_session`` waits ``channel_timeout`` (3600 s by default) and
``Channel.exec_command``/``recv_exit_status`` wait without a timeout (paramiko API docs,
https://docs.paramiko.org/en/stable/api/transport.html and .../api/channel.html). A host
that froze, or a half-open TCP connection (the kernel acknowledges, nobody answers),
would hold a step for an hour. So a step past its deadline closes the connection, which
wakes every one of those waits, and raises TimeoutError (an OSError: callers treat it as
a lost connection and reconnect).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shlex
import tarfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import fabric
import paramiko

from runner.errors import EventError

logger = logging.getLogger("runner.remote")

CONNECT_TIMEOUT = 10.0
RETRY_SECONDS = 2.0
KEEPALIVE_SECONDS = 15
STEP_TIMEOUT = 60.0  # a command, unless its caller gives another deadline
STREAM_TIMEOUT = 600.0  # a whole upload or download
CHUNK = 1 << 16

# Errors that mean "the connection is gone or never came", as opposed to a refused key.
CONNECTION_ERRORS = (OSError, EOFError, paramiko.SSHException)

_known_hosts_lock = threading.Lock()


class RemoteError(RuntimeError):
    """A remote step failed: the command, its exit status and its stderr."""


class HostKeyError(EventError):
    """A host key was refused (changed, or unknown under strict checking)."""


def _fingerprint(key: paramiko.PKey) -> str:
    return key.fingerprint  # "SHA256:..." like ssh-keygen -l


class _KnownHostsFile:
    """A known_hosts file shared by the threads (and processes) of one event."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path.with_name(self.path.name + ".lock"), "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
        return handle

    def _update(self, change) -> None:
        with _known_hosts_lock, self._locked():
            keys = paramiko.HostKeys()
            if self.path.exists():
                keys.load(str(self.path))
            change(keys)
            keys.save(str(self.path))

    def add(self, name: str, key: paramiko.PKey) -> None:
        """Record ``key`` for ``name`` (``host`` or ``[host]:port``)."""
        self._update(lambda keys: keys.add(name, key.get_name(), key))

    def forget(self, name: str) -> None:
        """Drop every key of ``name``: a new instance may reuse an old one's address."""
        self._update(lambda keys: keys.pop(name, None))

    def load_into(self, client: paramiko.SSHClient) -> None:
        """Load the recorded keys into ``client`` (mismatches then fail the handshake)."""
        if self.path.exists():
            client.load_host_keys(str(self.path))


class _TrustOnFirstUse(paramiko.MissingHostKeyPolicy):
    def __init__(self, known_hosts: _KnownHostsFile, strict: bool):
        self.known_hosts, self.strict = known_hosts, strict

    def missing_host_key(self, client, hostname, key):
        if self.strict:
            raise HostKeyError(
                f"host key of {hostname} ({key.get_name()} {_fingerprint(key)}) is not in "
                f"{self.known_hosts.path} and strict host key checking is on"
            )
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.known_hosts.add(hostname, key)
        logger.warning("trusting %s on first use: %s %s, recorded in %s", hostname,
                       key.get_name(), _fingerprint(key), self.known_hosts.path)


def known_host_name(host: str, port: int) -> str:
    """The name OpenSSH and paramiko file a host's key under."""
    return host if port == 22 else f"[{host}]:{port}"


def forget_host(known_hosts: str | os.PathLike[str], host: str, port: int) -> None:
    """Remove a host from a known_hosts file (its address now belongs to a new machine)."""
    _KnownHostsFile(known_hosts).forget(known_host_name(host, port))


class _CountingWriter:
    """File-like writer onto a channel's stdin, counting bytes."""

    def __init__(self, channel: paramiko.Channel):
        self.channel, self.count = channel, 0

    def write(self, data: bytes) -> int:
        self.channel.sendall(data)
        self.count += len(data)
        return len(data)


class _CountingReader:
    """File-like reader of a channel's stdout, counting bytes."""

    def __init__(self, channel: paramiko.Channel):
        self.channel, self.count = channel, 0

    def read(self, size: int = CHUNK) -> bytes:
        data = self.channel.recv(size if size and size > 0 else CHUNK)
        self.count += len(data)
        return data


class RemoteSession:
    """One SSH connection to ``user@host:port``, reused for every step of a run.

    ``connections``, ``round_trips``, ``bytes_sent`` and ``bytes_received`` count what
    the session cost (payload bytes of the tar streams and command output).
    """

    def __init__(self, host: str, user: str, key_path: str, port: int = 22, *,
                 known_hosts: str | os.PathLike[str], strict_host_keys: bool = False):
        self.host, self.user, self.port = host, user, port
        self._key_path = key_path
        self._known_hosts = _KnownHostsFile(known_hosts)
        self._strict = strict_host_keys
        self._connection: fabric.Connection | None = None
        self.connections = self.round_trips = self.bytes_sent = self.bytes_received = 0

    def __repr__(self) -> str:
        return f"RemoteSession({self.user}@{self.host}:{self.port})"

    # -- connection -----------------------------------------------------------------------

    def connect(self, ready_timeout: float = 0.0, stop: threading.Event | None = None) -> None:
        """Open the connection, retrying refused or dropped attempts for ``ready_timeout``
        seconds (a booting instance) unless ``stop`` is set (InterruptedError); an
        authentication or host key failure is final."""
        stop = stop or threading.Event()
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                self._open()
                return
            except (HostKeyError, paramiko.BadHostKeyException,
                    paramiko.AuthenticationException):
                raise
            except CONNECTION_ERRORS as error:
                if time.monotonic() + RETRY_SECONDS > deadline:
                    raise TimeoutError(
                        f"SSH to {self.user}@{self.host}:{self.port} did not answer within "
                        f"{ready_timeout:g} s: {error}"
                    ) from error
                if stop.wait(RETRY_SECONDS):
                    raise InterruptedError(
                        f"stopped while waiting for SSH on {self.host}:{self.port}") from error

    def _open(self) -> None:
        self.close()
        connection = fabric.Connection(
            self.host,
            user=self.user,
            port=self.port,
            connect_timeout=CONNECT_TIMEOUT,
            connect_kwargs={
                "key_filename": [self._key_path],
                "look_for_keys": False,
                "allow_agent": False,
                "banner_timeout": CONNECT_TIMEOUT,
                "auth_timeout": CONNECT_TIMEOUT,
            },
        )
        # fabric auto-adds unknown keys; an event's hosts are checked against its file.
        connection.client.set_missing_host_key_policy(
            _TrustOnFirstUse(self._known_hosts, self._strict))
        self._known_hosts.load_into(connection.client)
        self.connections += 1
        try:
            connection.open()
        except paramiko.BadHostKeyException as error:
            connection.close()
            raise HostKeyError(
                f"host key of {self.host}:{self.port} changed (got {_fingerprint(error.key)}, "
                f"{self._known_hosts.path} has {_fingerprint(error.expected_key)}): refusing "
                "to connect; remove the old entry if the host was rebuilt"
            ) from None
        except BaseException:
            connection.close()
            raise
        connection.transport.set_keepalive(KEEPALIVE_SECONDS)
        self._connection = connection

    @property
    def is_connected(self) -> bool:
        """Whether the connection is open and its transport alive."""
        return self._connection is not None and self._connection.is_connected

    def reconnect(self) -> None:
        """Open a new connection once (after the old one dropped)."""
        self._open()

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    # -- steps ----------------------------------------------------------------------------

    def run(self, command: str, timeout: float | None = None) -> tuple[int, str, str]:
        """Run ``command`` (one round trip) within ``timeout`` seconds (``STEP_TIMEOUT``);
        return (exit status, stdout, stderr)."""
        with self._deadline(timeout or STEP_TIMEOUT, command) as connection:
            result = connection.run(command, hide=True, warn=True, in_stream=False)
        self.bytes_received += len(result.stdout) + len(result.stderr)
        return result.exited, result.stdout, result.stderr

    @contextmanager
    def _deadline(self, seconds: float, step: str) -> Iterator[fabric.Connection]:
        """Give one step (one round trip) on the connection ``seconds``; past them the
        connection is closed and the step raises TimeoutError."""
        if not self.is_connected:
            raise ConnectionError(f"{self!r} is not connected")
        self.round_trips += 1
        connection = self._connection
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            connection.client.close()

        timer = threading.Timer(seconds, expire)
        timer.daemon = True
        timer.start()
        try:
            yield connection
        except Exception as error:
            if expired.is_set():
                raise self._timed_out(seconds, step) from error
            raise
        finally:
            timer.cancel()
        if expired.is_set():
            raise self._timed_out(seconds, step)

    def _timed_out(self, seconds: float, step: str) -> TimeoutError:
        self.close()
        return TimeoutError(f"{self!r}: {step!r} did not complete within {seconds:g} s; "
                            "connection closed")

    def upload(self, files: Iterable[tuple[str | os.PathLike[str], str]], remote_dir: str,
               before: str = "") -> None:
        """Send ``(local path, name in archive)`` pairs as one gzip tar stream, unpacked
        in ``remote_dir``; ``before`` runs first in the same round trip."""
        target = shlex.quote(remote_dir)
        command = f"{before}mkdir -p {target} && tar -xzf - -C {target}"
        with self._deadline(STREAM_TIMEOUT, f"upload to {remote_dir}") as connection, \
                self._channel(connection, command) as channel:
            writer = _CountingWriter(channel)
            with tarfile.open(fileobj=writer, mode="w|gz") as archive:
                for local, name in files:
                    archive.add(str(local), arcname=name, recursive=False)
            channel.shutdown_write()
            self.bytes_sent += writer.count
            self._finish(channel, command)

    def download(self, remote_dir: str, names_script: str, local_dir: str | os.PathLike[str],
                 before: str = "") -> None:
        """Fetch, as one gzip tar stream, the paths (relative to ``remote_dir``) that the
        shell snippet ``names_script`` sets with ``set --``; unpack them in ``local_dir``."""
        command = (f"{before}cd {shlex.quote(remote_dir)} && {names_script} && "
                   f"tar -czf - -- \"$@\"")
        with self._deadline(STREAM_TIMEOUT, f"download from {remote_dir}") as connection, \
                self._channel(connection, command) as channel:
            reader = _CountingReader(channel)
            try:
                with tarfile.open(fileobj=reader, mode="r|gz") as archive:
                    archive.extractall(local_dir, filter="data")
            except (tarfile.ReadError, EOFError) as error:
                self.bytes_received += reader.count
                self._finish(channel, command)
                raise RemoteError(f"{self!r}: unreadable tar stream: {error}") from error
            while reader.read():  # the gzip trailer padding, if any
                pass
            self.bytes_received += reader.count
            self._finish(channel, command)

    @staticmethod
    def _channel(connection: fabric.Connection, command: str) -> paramiko.Channel:
        channel = connection.transport.open_session()
        channel.exec_command(command)
        return channel

    def _finish(self, channel: paramiko.Channel, command: str) -> None:
        status = channel.recv_exit_status()
        stderr = b""
        while chunk := channel.recv_stderr(CHUNK):
            stderr += chunk
        if status != 0:
            raise RemoteError(
                f"{self!r}: {command!r} exited with {status}: {stderr.decode(errors='replace')}"
            )

