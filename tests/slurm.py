"""A real one-node Slurm for tests: Debian's ``slurm-wlm`` (22.05) and ``munge``, on loopback.

munged, slurmctld and slurmd run in the foreground as children of the test process, with
their own key, socket, slurm.conf, ports, state and spool folders in one temporary folder,
so that nothing of the machine's own Slurm or munge (if any) is used or touched. Slurm's
commands (sbatch, squeue, scancel, and dask-jobqueue's calls to them) find this cluster
through ``SLURM_CONF``. A daemon that does not start fails the test with its log's tail;
nothing here skips.

Import the fixture explicitly (``from tests.slurm import slurm``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

SBIN = Path("/usr/sbin")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
PARTITION = "ramp"
NODE = "localhost"
GPU_STAND_INS = ("/dev/null", "/dev/zero")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _node_hardware() -> str:
    """This machine's node line as slurmd itself measures it (``slurmd -C``), without the
    name and uptime: a node configured with more CPUs or memory than slurmd finds is
    drained ("Low RealMemory"), one with fewer wastes the machine."""
    completed = subprocess.run([SBIN / "slurmd", "-C"], capture_output=True, text=True,
                               check=True)
    line = completed.stdout.splitlines()[0]
    return " ".join(w for w in line.split() if not w.startswith(("NodeName=", "UpTime=")))


class SlurmFailure(RuntimeError):
    """A Slurm daemon did not start, or did not stop."""


class Slurm:
    """munged + slurmctld + slurmd: a one-node cluster with one partition, ``PARTITION``,
    and ``gpus`` stand-in GPUs.

    ``env`` is what a Slurm command (or a SLURMCluster submitting through one) needs.
    """

    def __init__(self, gpus: int = 0) -> None:
        if gpus > len(GPU_STAND_INS):
            raise ValueError(f"at most {len(GPU_STAND_INS)} stand-in GPUs")
        self.gpus = gpus
        for daemon in ("munged", "slurmctld", "slurmd"):
            if not os.access(SBIN / daemon, os.X_OK):
                raise SlurmFailure(f"{SBIN / daemon} is missing: apt-get install -y "
                                   "slurm-wlm munge")
        self.root = Path(tempfile.mkdtemp(prefix="ramp-runner-slurm-"))
        # munged refuses a socket in a folder that not everybody may enter, and
        # mkdtemp makes 0700 folders.
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: dict[str, subprocess.Popen] = {}
        self.started_at = time.time()

    # -- starting ------------------------------------------------------------------------

    def start(self) -> Slurm:
        """Start the three daemons; return once ``sinfo`` shows the node idle."""
        try:
            self._start_munge()
            self._write_conf()
            self._spawn("slurmctld", [SBIN / "slurmctld", "-D", "-f", self.conf])
            # -N: slurmd finds its node by the machine's host name otherwise, and the
            # configuration names the node ``localhost`` so that it is the same everywhere.
            self._spawn("slurmd", [SBIN / "slurmd", "-D", "-N", NODE, "-f", self.conf])
            self._wait_for_idle_node()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        folder = self.root / "munge"
        folder.mkdir(mode=0o755)
        key = folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)  # munged refuses a key others can read
        self.munge_socket = folder / "munge.socket"
        self._spawn("munged", [SBIN / "munged", "--foreground", f"--key-file={key}",
                               f"--socket={self.munge_socket}",
                               f"--pid-file={folder / 'munged.pid'}",
                               f"--seed-file={folder / 'munged.seed'}",
                               f"--log-file={folder / 'munged.log'}"])
        self._wait("munged", self.munge_socket.exists)

    def _write_conf(self) -> None:
        (self.root / "state").mkdir()
        (self.root / "spool").mkdir()
        self.conf.write_text("\n".join([
            "ClusterName=ramptest",
            # The controller on loopback, on free ports: several test runs may share the
            # machine, and nothing is reachable from outside it.
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            # The tests run as root; so do the daemons and the jobs (as Slurm's own units do,
            # except for slurmctld, which Debian runs as the ``slurm`` user).
            "SlurmUser=root",
            "SlurmdUser=root",
            # This cluster's own munged, not the machine's /run/munge one.
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "CredType=cred/munge",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'slurmd.log'}",
            # No cgroup plugin: linuxproc follows the jobs' process trees through parent
            # pids (a Dask worker's processes stay its descendants, so scancel reaches
            # them all), task/none binds nothing; both work in containers whose cgroup
            # hierarchies Slurm may not own.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            # Debian's default is pmix, whose library is not installed: job steps must not
            # ask for it (the daemons still log once that they cannot load it: harmless).
            "MpiDefault=none",
            # The default (/bin/mail) is not installed: an error line at every start.
            "MailProg=/bin/true",
            # Cores and memory are consumed per job, as on a shared cluster: a job asking
            # for more memory than is free waits.
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            # scancel's SIGTERM is followed by SIGKILL after 2 s, not the default 30.
            "KillWait=2",
            # A node that was down (slurmd restarted) takes jobs again by itself.
            "ReturnToService=2",
            *self._gpu_lines(),
            f"NodeName={NODE} NodeAddr=127.0.0.1 {_node_hardware()}{self._node_gres()} "
            "State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _gpu_lines(self) -> list[str]:
        """GPUs that Slurm counts and hands out (``--gres=gpu:N``) but that are no device:
        enough to see a job ask for them and wait for them."""
        if not self.gpus:
            return []
        # Slurm counts gpu gres by their device files (Count alone is "0 < N" and the
        # node INVAL); any character device stands in for one.
        devices = ",".join(GPU_STAND_INS[:self.gpus])
        (self.root / "gres.conf").write_text(f"NodeName={NODE} Name=gpu File={devices}\n")
        return ["GresTypes=gpu"]

    def _node_gres(self) -> str:
        return f" Gres=gpu:{self.gpus}" if self.gpus else ""

    def _spawn(self, name: str, argv: list) -> None:
        with open(self.root / f"{name}.out", "ab") as output:
            self.daemons[name] = subprocess.Popen(
                [str(a) for a in argv], stdout=output, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=self.env, cwd=self.root,
                start_new_session=True)

    def _wait(self, name: str, ready, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for daemon, process in self.daemons.items():
                if process.poll() is not None:
                    raise SlurmFailure(f"{daemon} exited ({process.returncode}) while "
                                       f"waiting for {name}:\n{self.log_tails()}")
            if ready():
                return
            time.sleep(0.2)
        raise SlurmFailure(f"{name} not ready after {timeout} s:\n{self.log_tails()}")

    def _wait_for_idle_node(self) -> None:
        def idle() -> bool:
            states = self.command("sinfo", "-h", "-N", "-o", "%T", check=False)
            return states.returncode == 0 and states.stdout.split() == ["idle"]

        self._wait("the node to be idle in sinfo", idle)

    def log_tails(self, lines: int = 30) -> str:
        """The last lines of every daemon's output and log: what a failure shows."""
        tails = []
        for path in sorted(self.root.glob("*.out")) + sorted(self.root.glob("*.log")) + \
                sorted(self.root.glob("munge/*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(tails)

    # -- using ---------------------------------------------------------------------------

    def command(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a Slurm command (``sinfo``, ``squeue``, ``scancel``...) on this cluster."""
        return subprocess.run(argv, capture_output=True, text=True, env=self.env, check=check,
                              timeout=30)

    def jobs(self) -> list[str]:
        """The ids of the jobs pending, running or completing."""
        return self.command("squeue", "-h", "-o", "%i").stdout.split()

    def wait_for_no_jobs(self, timeout: float) -> list[str]:
        """Wait up to ``timeout`` seconds for ``squeue`` to be empty; return what is left."""
        deadline = time.monotonic() + timeout
        while (left := self.jobs()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    # -- stopping ------------------------------------------------------------------------

    def stop(self) -> None:
        """Cancel every job, stop the daemons, delete the folder; fail if a process is left."""
        if "slurmd" in self.daemons and self.daemons["slurmd"].poll() is None:
            # Jobs first: a job's slurmstepd outlives slurmd, and linuxproc kills the whole
            # tree of each job only while slurmd runs.
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.command("scancel", "--full", *self.jobs(), check=False)
                self.wait_for_no_jobs(STOP_TIMEOUT)
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.daemons.pop(name, None)
            if process is not None:
                _stop_group(process)
        # A cancelled job's processes may take a moment to exit after squeue forgets it.
        deadline = time.monotonic() + STOP_TIMEOUT
        while (left := self._leftovers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        shutil.rmtree(self.root, ignore_errors=True)
        if left:
            for process in left:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            raise SlurmFailure(f"processes left after stopping Slurm: {left}")

    def _leftovers(self) -> list[psutil.Process]:
        """Job steps and job processes of this cluster still alive after its daemons.

        The caller's own children inherit ``SLURM_CONF`` too (a LocalCluster's workers),
        but they are the caller's to stop: job steps leave slurmd's tree (parent: init).
        """
        own = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
        left = []
        for process in psutil.process_iter(["name", "create_time"]):
            with contextlib.suppress(psutil.Error):
                if process.info["create_time"] < self.started_at - 1 or process.pid in own:
                    continue
                if process.info["name"] == "slurmstepd" or \
                        process.environ().get("SLURM_CONF") == str(self.conf):
                    if process.status() != psutil.STATUS_ZOMBIE:
                        left.append(process)
        return left

    def __enter__(self) -> Slurm:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _stop_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def slurm():
    """A running one-node Slurm with one stand-in GPU, shared by a test module (its daemons
    take seconds to start). ``SLURM_CONF`` points at it for the module, so that
    dask-jobqueue's ``sbatch`` finds it."""
    try:
        cluster = Slurm(gpus=1).start()
    except SlurmFailure as failure:
        pytest.fail(str(failure))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(cluster.conf))
        yield cluster
    try:
        cluster.stop()
    except SlurmFailure as failure:
        pytest.fail(str(failure))
