"""Helpers for the remote tests: an OpenSSH sshd on 127.0.0.1, moto's EC2 backend, and
worker sections whose "remote" kit folder lives on this machine.

The fixtures that start these parts (``sshd``, ``moto_server``, ``aws``, ``remote_kit``,
``instance_at_sshd``) are in the tests.real_parts plugin. An sshd that cannot start fails
the test; nothing here skips. The ``sshd`` fixture logs in as this process's user (root);
``running_sshd(folder, user=...)`` as another, e.g. one with passwordless sudo as ``ubuntu``
on an AMI (``ensure_sudo_user``), whose runs execute as the AMI's run user
(``ensure_run_user``) with a Python it may execute (``readable_python``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import getpass
import os
import pwd
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.events import EXAMPLE

REPO = Path(__file__).resolve().parents[1]
SSHD = "/usr/sbin/sshd"
VENV_BIN = str(Path(sys.executable).parent)
REGION = "eu-west-3"
AMI_BASE = "iris-ramp-worker"
SUBMISSIONS = ("starting_kit", "random_forest", "gradient_boosting", "raising_error", "hanging")
# The AMI's user without sudo (ami/worker-guard.yml), made on this machine by ensure_run_user.
RUN_USER = "ramp-run"
# A login user with sudo, as ``ubuntu`` on an AMI, made on this machine by ensure_sudo_user.
SUDO_USER = "ramp-login"


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_banner(port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if sock.recv(64).startswith(b"SSH-"):
                    return True
        except OSError:
            time.sleep(0.1)
    return False


@dataclasses.dataclass(frozen=True)
class SSHServer:
    """A running sshd: where it listens, who may log in with which key."""

    host: str
    port: int
    user: str
    key_path: str
    host_public_key: str
    pid: int = 0  # the listening sshd; each connection is served by a child of it


@contextlib.contextmanager
def running_sshd(folder: Path, user: str | None = None,
                 environment: dict[str, str] | None = None) -> Iterator[SSHServer]:
    """An OpenSSH sshd on 127.0.0.1 with its own host key and one user key, its files in
    ``folder``; stopped on exit. The key logs in as ``user`` (default: this process's),
    who must be able to read ``folder`` (sshd reads the authorized keys as that user);
    its sessions get ``environment`` (a login user's own variables, secrets included)."""
    if not os.access(SSHD, os.X_OK):
        pytest.fail(f"{SSHD} is missing: apt-get install -y openssh-server")
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)],
                       check=True)
    shutil.copyfile(folder / "user_key.pub", folder / "authorized_keys")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = open(folder / "sshd.log", "wb")  # noqa: SIM115 - closed on exit
    process = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", "/dev/null", "-p", str(port),
         "-o", "ListenAddress=127.0.0.1",
         "-o", f"HostKey={folder / 'host_key'}",
         "-o", f"AuthorizedKeysFile={folder / 'authorized_keys'}",
         "-o", "PidFile=none", "-o", "StrictModes=no",
         "-o", "Subsystem=sftp internal-sftp",
         "-o", "PermitRootLogin=prohibit-password",
         "-o", "UsePAM=no", "-o", "MaxStartups=50",
         *(f"-oSetEnv={name}={value}" for name, value in (environment or {}).items())],
        stdout=log, stderr=subprocess.STDOUT,
    )
    if not _wait_for_banner(port, time.monotonic() + 15):
        process.kill()
        log.close()
        pytest.fail(f"sshd did not start: {(folder / 'sshd.log').read_text()[-2000:]}")
    try:
        yield SSHServer("127.0.0.1", port, user or getpass.getuser(), str(folder / "user_key"),
                        (folder / "host_key.pub").read_text().strip(), process.pid)
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def ensure_run_user(name: str = RUN_USER) -> pwd.struct_passwd:
    """The user ``name`` as the AMI makes it (its own group, no sudo), created if missing
    (as root: the tests run as root, like the login user of the sshd)."""
    if shutil.which("sudo") is None:
        pytest.fail("sudo is missing: apt-get install -y sudo (or run .ci/bootstrap)")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    made = subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", "--user-group",
                           name], capture_output=True, text=True)
    # Another test process may have made it in between (useradd exits 9 then).
    if made.returncode not in (0, 9):
        pytest.fail(f"useradd {name} exited {made.returncode}: {made.stderr.strip()}")
    return pwd.getpwnam(name)


def ensure_sudo_user(name: str = SUDO_USER) -> pwd.struct_passwd:
    """A login user with passwordless sudo, as ``ubuntu`` on an AMI (cloud-init's rule),
    created if missing: its own group, no password but not locked (sshd without PAM
    refuses a locked account's keys)."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        made = subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash",
                               "--user-group", name], capture_output=True, text=True)
        if made.returncode not in (0, 9):
            pytest.fail(f"useradd {name} exited {made.returncode}: {made.stderr.strip()}")
        entry = pwd.getpwnam(name)
    subprocess.run(["usermod", "-p", "*", name], check=True)
    rule = Path("/etc/sudoers.d") / f"ramp-runner-tests-{name}"
    text = f"{name} ALL=(ALL) NOPASSWD:ALL\n"
    if not rule.exists() or rule.read_text() != text:
        staged = rule.with_name(f".{rule.name}.new")  # sudo skips names with a dot
        staged.write_text(text)
        staged.chmod(0o440)
        checked = subprocess.run(["visudo", "-cf", str(staged)], capture_output=True, text=True)
        if checked.returncode != 0:
            pytest.fail(f"visudo refused {text!r}: {checked.stdout}{checked.stderr}")
        staged.replace(rule)
    return entry


def readable_python(folder: Path) -> Path:
    """A Python environment another user can run, in ``folder``: this machine's system
    Python of the tests' version with a hard-linked copy of the tests' packages (the tests'
    own interpreter may live in root's home, which no other user may enter). Its bin
    folder (with ``ramp-test``) is returned."""
    system = Path("/usr/bin/python3")
    version = subprocess.run([str(system), "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True)
    if version.stdout.strip() != str(sys.version_info[:2]):
        pytest.fail(f"{system} is not Python {sys.version_info[:2]}: {version.stdout.strip()}")
    subprocess.run([str(system), "-m", "venv", "--without-pip", str(folder)], check=True)
    target = folder / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    packages = Path(sysconfig.get_paths()["purelib"])
    shutil.rmtree(target / "site-packages")
    linked = subprocess.run(["cp", "-al", str(packages), str(target / "site-packages")],
                            capture_output=True)
    if linked.returncode != 0:  # another file system: copy
        shutil.rmtree(target / "site-packages", ignore_errors=True)
        shutil.copytree(packages, target / "site-packages", symlinks=True)
    script = (Path(VENV_BIN) / "ramp-test").read_text().splitlines()
    (folder / "bin" / "ramp-test").write_text(
        "\n".join([f"#!{folder / 'bin' / 'python'}", *script[1:]]) + "\n")
    (folder / "bin" / "ramp-test").chmod(0o755)
    return folder / "bin"


def host_kit(folder: Path) -> Path:
    """The kit as an AMI (or an SSH host) has it, made in ``folder``: a copy of the iris kit
    with its data inside."""
    kit = folder / "ramp-kits" / "iris"
    shutil.copytree(EXAMPLE / "ramp-kits" / "iris", kit,
                    ignore=shutil.ignore_patterns("__pycache__", "submissions"))
    data = EXAMPLE / "ramp-data" / "iris" / "data"
    if not data.is_dir():
        shutil.copy(EXAMPLE / "ramp-data" / "iris" / "prepare_data.py", folder)
        subprocess.run([sys.executable, "prepare_data.py"], cwd=folder, check=True)
        data = folder / "data"
    shutil.copytree(data, kit / "data")
    (kit / "submissions").mkdir()
    return kit


def add_ami(name: str, created: str, owner: str | None = None, state: str = "available",
            tags: dict[str, str] | None = None) -> str:
    """Put an AMI with a chosen creation date (owner, tags) straight into moto's backend."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends
    from moto.ec2.models.amis import Ami
    from moto.ec2.utils import random_ami_id

    backend = ec2_backends[DEFAULT_ACCOUNT_ID][REGION]
    ami_id = random_ami_id()
    backend.amis[ami_id] = Ami(backend, ami_id, name=name, owner_id=owner, state=state,
                               creation_date=datetime.datetime.fromisoformat(created))
    if tags:
        backend.create_tags([ami_id], tags)
    return ami_id


@contextlib.contextmanager
def frozen(sshd: SSHServer, local_port: int) -> Iterator[list[psutil.Process]]:
    """Stop (SIGSTOP) the sshd processes serving the connection from ``local_port``: a host
    that froze, or a half-open TCP connection (the kernel still acknowledges, nobody answers).
    They are continued on exit."""
    serving = []
    for child in psutil.Process(sshd.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):  # other tests' sessions come and go
            if any(c.raddr and c.raddr.port == local_port
                   for c in child.net_connections(kind="tcp")):
                serving.append(child)
    assert serving, f"no sshd process serves the connection from port {local_port}"
    for process in serving:
        process.suspend()
    try:
        yield serving
    finally:
        for process in serving:
            with contextlib.suppress(psutil.Error):
                process.resume()


# Ways a remote run can fail after launch through no fault of the submission.
FAULTS = ("poll-hangs", "poll-raises-CommandTimedOut", "poll-raises", "collect-raises")


def inject_fault(monkeypatch, fault: str, remote_kit: Path) -> None:
    """Make the next remote runs fail as ``fault`` says (poll-* at their first poll)."""
    from invoke.exceptions import CommandTimedOut
    from invoke.runners import Result

    from runner.ssh import remote_worker
    from runner.ssh.session import RemoteSession

    worker = remote_worker.RemoteWorker

    def raising(error):
        def parse(output):
            raise error
        return staticmethod(parse)

    if fault == "poll-hangs":  # a real hung command on the host (a stuck disk, a full host)
        monkeypatch.setattr(remote_worker, "POLL_TIMEOUT", 2.0)
        monkeypatch.setattr(worker, "_poll_script", lambda self: "sleep 30")
    elif fault == "poll-raises-CommandTimedOut":
        monkeypatch.setattr(worker, "_parse_poll", raising(
            CommandTimedOut(Result(command="poll", exited=-1), timeout=60)))
    elif fault == "poll-raises":
        monkeypatch.setattr(worker, "_parse_poll", raising(RuntimeError("garbled poll")))
    elif fault == "collect-raises":  # the run's log vanished: tar fails on the host
        download = RemoteSession.download

        def download_without_log(self, remote_dir, names_script, local_dir, before=""):
            for log in (remote_kit / ".ramp-runner").glob("*/log"):
                log.unlink()
            return download(self, remote_dir, names_script, local_dir, before)

        monkeypatch.setattr(RemoteSession, "download", download_without_log)
    else:
        raise ValueError(fault)


def live_instances(client) -> list[dict]:
    """Instances of the moto account that are not terminated."""
    reservations = client.describe_instances(Filters=[
        {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}
    ])["Reservations"]
    return [i for r in reservations for i in r["Instances"]]


def session_members(sid: int) -> list[psutil.Process]:
    """Live processes of the session ``sid`` (the run's whole tree)."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.Error):
            pass
    return members


def all_instances(client) -> list[dict]:
    """Every instance moto knows, whatever its state."""
    return [i for r in client.describe_instances()["Reservations"] for i in r["Instances"]]


def remote_dispatcher(**more) -> dict:
    """The dispatcher section of a remote test event (for ``tests.events.make_event``): one
    run at a time, polled every 0.2 s, exit when done; ``more`` updates it."""
    return {"hunger_policy": "exit", "n_workers": 1, "n_threads": 1,
            "time_between_collection": 0.2, **more}


def _local_kit(remote_kit: Path) -> dict:
    """The kit and data the dispatcher reads here (scores are checked against the kit):
    the remote kit folder has both, as on an AMI."""
    return {"kit_dir": str(remote_kit), "data_dir": str(remote_kit)}


def aws_worker_section(sshd: SSHServer, remote_kit: Path, **more) -> dict:
    """The seed's AWS worker section, pointed at moto and the local sshd."""
    return {
        "worker_type": "aws",
        "region_name": REGION,
        "ami_image_name": AMI_BASE,
        "ami_user_name": sshd.user,
        "instance_type": "t3.micro",
        "use_spot_instance": False,
        "key_name": "iris_key",
        "security_group": "ramp-workers",
        "key_path": sshd.key_path,
        "remote_ramp_kit_folder": str(remote_kit),
        **_local_kit(remote_kit),
        "remote_path_prefix": VENV_BIN,
        "memory_profiling": True,
        # ramp-test's path, whose output these tests read; the hidden-labels test says auto.
        "hidden_test_labels": "off",
        "timeout": 120,
        "ssh_ready_timeout": 20,
        # The shared kit and Python are root's alone here: tests/ssh/test_run_as_user.py
        # runs the AWS default (the AMI's ramp-run) with its own.
        "run_as_user": None,
        **more,
    }


def ssh_worker_section(sshd: SSHServer, remote_kit: Path, **more) -> dict:
    """An SSH worker section with the local sshd as its one host."""
    return {
        "worker_type": "ssh",
        "hosts": [{"host": sshd.host, "port": sshd.port, "user": sshd.user,
                   "key_path": sshd.key_path, "remote_ramp_kit_folder": str(remote_kit)}],
        **_local_kit(remote_kit),
        "remote_path_prefix": VENV_BIN,
        "memory_profiling": True,
        # ramp-test's path, whose output these tests read; the hidden-labels test says auto.
        "hidden_test_labels": "off",
        "timeout": 120,
        **more,
    }


def dispatch_within(config, seconds: float, what: str) -> None:
    """Run the real dispatcher in this process (where faults are monkeypatched in), and
    fail if it is still waiting after ``seconds``."""
    from runner.dispatcher import Dispatcher

    thread = threading.Thread(target=Dispatcher(config).run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{what}: the dispatcher is still waiting"
