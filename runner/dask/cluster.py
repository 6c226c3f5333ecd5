"""A dask.distributed cluster on loopback to try ``worker_type: dask`` (``invoke dask-cluster``).

A ``dask scheduler`` and ``dask worker`` processes run, each in a session of its own so that
stopping the cluster ends every process it started; with ``tls`` a throw-away CA signs a
certificate for the cluster and one for the dispatcher, and plain connections are refused.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import distributed
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from runner import signals

START_TIMEOUT = 60.0
# Dask's own default scheduler port: stable across restarts, so configs can name it.
DEFAULT_PORT = 8786
ADDRESS_FILE = "scheduler-address"
STOP_GRACE_SECONDS = 10.0


@dataclasses.dataclass(frozen=True)
class Certificates:
    """PEM files: the CA, the cluster's certificate (scheduler and workers), the client's."""

    ca_file: Path
    cluster_cert: Path
    cluster_key: Path
    client_cert: Path
    client_key: Path

    def client_security(self) -> distributed.Security:
        """The ``distributed.Security`` a dispatcher (or any client) connects with."""
        return distributed.Security(tls_ca_file=str(self.ca_file),
                                    tls_client_cert=str(self.client_cert),
                                    tls_client_key=str(self.client_key),
                                    require_encryption=True)


def make_certificates(folder: str | os.PathLike[str],
                      hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                      days: int = 30) -> Certificates:
    """Write a new CA and two certificates it signs (cluster, client) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ramp-runner dask CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca_file": folder / "ca.pem"}
    paths["ca_file"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for role in ("cluster", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        names = [x509.DNSName(h) for h in hosts if not _is_ip(h)]
        names += [x509.IPAddress(ipaddress.ip_address(h)) for h in hosts if _is_ip(h)]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                        f"ramp-runner dask {role}")]))
            .issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            # Scheduler and workers are servers and clients of each other.
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        paths[f"{role}_cert"] = folder / f"{role}.pem"
        paths[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{role}_key"] = folder / f"{role}.key"
        key_bytes = key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
        descriptor = os.open(paths[f"{role}_key"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(key_bytes)
    return Certificates(**paths)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class LoopbackCluster:
    """``dask scheduler`` + ``dask worker --nworkers N`` on 127.0.0.1, as subprocesses.

    Each Dask worker has one thread: one Dask worker per RAMP slot. ``folder`` holds the
    scheduler file, the certificates, the processes' logs and the workers' local
    directories; ``cwd`` is where the processes run (by default ``folder``).
    """

    def __init__(self, folder: str | os.PathLike[str], workers: int = 2, tls: bool = False,
                 dashboard: bool = False, cwd: str | os.PathLike[str] | None = None,
                 env: dict[str, str] | None = None, port: int = 0):
        self.folder = Path(folder).resolve()
        self.n_workers = workers
        self.port = port
        self.cwd = Path(cwd).resolve() if cwd else self.folder
        self.tls = tls
        self.dashboard = dashboard
        self.env = {**os.environ, **(env or {})}
        self.certificates: Certificates | None = None
        self.address: str | None = None
        self.processes: list[subprocess.Popen] = []

    def start(self) -> LoopbackCluster:
        """Start the scheduler and workers; return once every worker has joined."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        tls_options: list[str] = []
        if self.tls:
            self.certificates = make_certificates(self.folder / "certificates")
            self.env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] = "True"
            tls_options = ["--tls-ca-file", str(self.certificates.ca_file),
                           "--tls-cert", str(self.certificates.cluster_cert),
                           "--tls-key", str(self.certificates.cluster_key)]
        scheduler_file = self.folder / "scheduler.json"
        scheduler_file.unlink(missing_ok=True)
        dashboard = (["--dashboard-address", "127.0.0.1:8787"] if self.dashboard
                     else ["--no-dashboard"])
        self._spawn("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                  "--protocol", "tls" if self.tls else "tcp",
                                  "--scheduler-file", str(scheduler_file),
                                  *dashboard, *tls_options])
        self.address = self._read_address(scheduler_file)
        self._spawn("workers", ["worker", self.address, "--host", "127.0.0.1",
                                "--nworkers", str(self.n_workers), "--nthreads", "1",
                                "--local-directory", str(self.folder / "workers"),
                                "--no-dashboard", *tls_options])
        with self.client() as client:
            client.wait_for_workers(self.n_workers, timeout=START_TIMEOUT)

    def _spawn(self, name: str, arguments: list[str]) -> None:
        # The child keeps its own copy of the log's descriptor.
        with open(self.folder / f"{name}.log", "ab") as log:
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "dask", *arguments],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.cwd, env=self.env, start_new_session=True))

    def _read_address(self, scheduler_file: Path) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.processes[0].poll() is not None:
                raise RuntimeError(f"dask scheduler exited; see {self.folder / 'scheduler.log'}")
            try:
                return json.loads(scheduler_file.read_text())["address"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.1)  # the scheduler writes the file once it listens
        raise TimeoutError(f"no scheduler address in {scheduler_file} after {START_TIMEOUT} s")

    def client(self, **kwargs) -> distributed.Client:
        """A client of this cluster (with the client certificate under TLS)."""
        security = self.certificates.client_security() if self.certificates else None
        return distributed.Client(self.address, security=security, set_as_default=False,
                                  **kwargs)

    def worker_snippet(self) -> str:
        """The ``worker:`` section to paste into an event's config.yml."""
        return worker_snippet(self.address, self.n_workers, self.certificates)

    def stop(self) -> None:
        """Stop every process started (TERM, then KILL after a grace period); idempotent."""
        for process in reversed(self.processes):
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in reversed(self.processes):
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # Nannies' worker processes share the group: KILL what TERM left behind.
            _signal_group(process, signal.SIGKILL)
            process.wait()
        self.processes = []

    def __enter__(self) -> LoopbackCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def worker_snippet(address: str, n_workers: int, certificates: Certificates | None) -> str:
    """The ``worker:`` section an event's config.yml needs to use the cluster at ``address``
    (with the client's certificate when the cluster requires TLS)."""
    lines = ["worker:", "  worker_type: dask", f'  dask_scheduler: "{address}"',
             f"  n_workers: {n_workers}  # one Dask worker per RAMP slot"]
    if certificates:
        c = certificates
        lines += ["  dask_security:", f"    tls_ca_file: {c.ca_file}",
                  f"    tls_client_cert: {c.client_cert}",
                  f"    tls_client_key: {c.client_key}", "    require_encryption: true"]
    return "\n".join(lines) + "\n"


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass  # the group is already gone


def serve(folder: str | os.PathLike[str], workers: int = 2, tls: bool = False,
          port: int = DEFAULT_PORT) -> None:
    """Run a loopback cluster until Ctrl+C (or SIGTERM), printing the ``worker:`` snippet.

    The scheduler listens on ``port`` (Dask's usual 8786, so that a config naming
    ``tcp://127.0.0.1:8786`` needs no edit), and its address is also written to
    ``folder/scheduler-address`` and ``folder/worker-snippet.yml``.
    """
    # The workers run the task code of this very checkout, installed or not.
    source = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)
    cluster = LoopbackCluster(folder, workers=workers, tls=tls, dashboard=True,
                              env={"PYTHONPATH": path}, port=port)

    def announce() -> None:
        snippet = announce_address(cluster.folder, cluster.address, cluster.worker_snippet())
        print(f"Dask scheduler at {cluster.address}, {workers} worker(s) of 1 thread; "
              f"dashboard http://127.0.0.1:8787\nPaste into the event's config.yml "
              f"(also in {snippet}):\n\n{cluster.worker_snippet()}\nCtrl+C stops the cluster.")

    serve_until_interrupted(cluster, announce)


def announce_address(folder: Path, address: str, snippet: str) -> Path:
    """Write ``folder/scheduler-address`` and ``folder/worker-snippet.yml``; return the
    latter's path."""
    (folder / ADDRESS_FILE).write_text(f"{address}\n")
    path = folder / "worker-snippet.yml"
    path.write_text(snippet)
    return path


def serve_until_interrupted(cluster, announce: Callable[[], None]) -> None:
    """Start ``cluster`` (a context manager), call ``announce``, keep it running until
    Ctrl+C or SIGTERM (``runner.signals``), then stop it.

    A signal that comes while the cluster starts stops it once started: never half-started.
    """
    stopping = threading.Event()
    with signals.stop_on_signals(stopping.set), cluster:
        if not stopping.is_set():
            announce()
        stopping.wait()
        print("stopping the cluster")
