"""Dask workers as Slurm jobs (dask-jobqueue's ``SLURMCluster``), sized for an event's runs.

The scheduler runs here (on the login node); each Slurm job is one Dask worker with one
thread, so one run at a time, with the run's memory, CPUs and GPUs. ``adapt`` submits jobs
while submissions wait and cancels them when idle, down to zero.

Slurm's walltime would kill a Dask worker in the middle of a run (dask-jobqueue issues 122
and 611), and Dask's own ``--lifetime`` does too: it retires the worker at that time and
cancels the task it is running. So a Dask worker here takes new runs during ``lifetime``
(± ``stagger``) only, then finishes the run it has and leaves (``DrainBeforeWalltime``);
the job's walltime is that plus the run's ``timeout`` plus a margin.

A run lost with its job (scancel, preemption, node failure) fails at once as a lost worker
(``KilledWorker``), which the Dask worker reports as ``retry``: it is not run again silently
on a new job that might wait in Slurm's queue only to refuse the second run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dask
import distributed
from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin

from runner.config import EventConfig
from runner.dask.cluster import (
    Certificates,
    announce_address,
    make_certificates,
    serve_until_interrupted,
    worker_snippet,
)

# What the Dask worker process itself needs on top of the run's memory limit (its job's
# memory is what Slurm enforces, for the whole job).
WORKER_OVERHEAD_MB = 512
# Between the end of a run's timeout and the walltime: the worker's start, the results'
# trip back to the dispatcher, the worker's retirement.
WALLTIME_MARGIN_SECONDS = 300.0
# Workers leave at lifetime ± this fraction of it, so that they do not all leave at once.
STAGGER_FRACTION = 0.1
# An idle job is kept this long for the next submission: a new one may wait in the queue.
IDLE_SECONDS = 60.0
ADAPT_INTERVAL_SECONDS = 1.0
DRAIN_POLL_SECONDS = 1.0
START_TIMEOUT = 60.0
CERTIFICATE_FILES = ("ca.pem", "cluster.pem", "cluster.key", "client.pem", "client.key")


@dataclasses.dataclass(frozen=True)
class SlurmJobs:
    """What each Slurm job (one Dask worker, one run at a time) asks for, and how many."""

    max_jobs: int
    timeout: float
    memory_limit_mb: int
    cpus_per_run: int = 1
    gpus_per_run: int = 0
    # How long a Dask worker takes new runs; None: the run's timeout.
    lifetime: float | None = None

    def __post_init__(self) -> None:
        # A worker that takes no run would be replaced by another, job after job.
        if self.lifetime is not None and self.lifetime <= 0:
            raise ValueError(f"lifetime must be positive seconds, not {self.lifetime!r}")

    @classmethod
    def from_event(cls, config: EventConfig, **overrides: Any) -> SlurmJobs:
        """The jobs an event's runs need: its slots, ``timeout``, ``memory_limit_mb``,
        ``n_threads`` and ``gpus_per_run`` (0 when the worker section has no such key)."""
        worker = config.worker
        values = {"max_jobs": config.dispatcher.slots, "timeout": worker.timeout,
                  "memory_limit_mb": worker.memory_limit_mb,
                  "cpus_per_run": config.dispatcher.n_threads or 1,
                  "gpus_per_run": getattr(worker, "gpus_per_run", 0) or 0}
        return cls(**{**values, **overrides})

    @property
    def accepting_seconds(self) -> float:
        """How long, on average, a Dask worker takes new runs."""
        return self.timeout if self.lifetime is None else self.lifetime

    @property
    def stagger_seconds(self) -> float:
        """How far before or after ``accepting_seconds`` a given worker stops taking runs."""
        return self.accepting_seconds * STAGGER_FRACTION

    @property
    def walltime_seconds(self) -> float:
        """The job's time limit: the last moment a run may start, plus a whole run, plus
        the margin: Slurm never ends a job in the middle of a run."""
        return (self.accepting_seconds + self.stagger_seconds + self.timeout
                + WALLTIME_MARGIN_SECONDS)

    def walltime(self) -> str:
        """``walltime_seconds`` as Slurm's ``days-hours:minutes:seconds``."""
        seconds = math.ceil(self.walltime_seconds)
        days, seconds = divmod(seconds, 86400)
        hours, seconds = divmod(seconds, 3600)
        minutes, seconds = divmod(seconds, 60)
        return f"{days}-{hours:02d}:{minutes:02d}:{seconds:02d}"

    def job_directives(self) -> list[str]:
        """``#SBATCH`` options beyond those dask-jobqueue writes itself."""
        return [f"--gres=gpu:{self.gpus_per_run}"] if self.gpus_per_run else []


class DrainBeforeWalltime(WorkerPlugin):
    """After ``after`` ± ``stagger`` seconds, the Dask worker takes no new task, waits for
    the one it runs, hands its results to other workers, and leaves (its job ends)."""

    name = "ramp-runner-drain-before-walltime"

    def __init__(self, after: float, stagger: float):
        self.after = after
        self.stagger = stagger
        self._drain: asyncio.Task | None = None

    def setup(self, worker: distributed.Worker) -> None:
        """Start counting when the worker joins."""
        delay = max(0.0, self.after + random.uniform(-self.stagger, self.stagger))
        self._drain = asyncio.get_running_loop().create_task(self._drain_after(worker, delay))

    def teardown(self, worker: distributed.Worker) -> None:
        """Stop counting when the worker closes for another reason."""
        if self._drain is not None:
            self._drain.cancel()

    async def _drain_after(self, worker: distributed.Worker, delay: float) -> None:
        await asyncio.sleep(delay)
        # The scheduler sends no more tasks, and the worker starts none of those it has.
        worker.status = Status.closing_gracefully
        while True:
            while worker.state.executing:
                await asyncio.sleep(DRAIN_POLL_SECONDS)
            # Expected by the scheduler: tasks waiting here go elsewhere without counting
            # as failed, and results not yet fetched move to another worker first.
            retired = await worker.scheduler.retire_workers(
                workers=[worker.address], close_workers=False, remove=True,
                stimulus_id=f"ramp-runner-drain-{time.time()}")
            if retired:
                break
            # No other worker could take the results yet: wait for one, or for the
            # dispatcher to fetch them.
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        # Forgotten first: the close tears this plugin down, which must not cancel the close.
        self._drain = None
        await worker.close(nanny=True, reason="ramp-runner: drained before the walltime")


def _slurm_cluster_class() -> type:
    """dask-jobqueue's SLURMCluster, forgetting a job as soon as its worker leaves.

    SpecCluster keeps a departed worker's job for ``lost-worker-timeout`` (15 s) and its
    spec for good: a new job under the same name waits those 15 s, and one is submitted
    then whether or not a run needs it. Forgotten at once, the job is cancelled (if Slurm
    has not ended it) and ``adapt`` asks for a new one only when a run waits. A worker that
    left has lost its runs anyway (``allowed-failures`` 0).
    """
    handler = signal.getsignal(signal.SIGINT)
    from dask_jobqueue import SLURMCluster

    # Importing dask_jobqueue makes Ctrl+C a silent sys.exit() (its runner module sets a
    # SIGINT handler): Ctrl+C stays KeyboardInterrupt, which ramp-runner handles.
    if handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)

    class ForgettingSLURMCluster(SLURMCluster):
        def _update_worker_status(self, op, msg):
            if op == "remove":
                self.worker_spec.pop(self.scheduler_info["workers"][msg]["name"], None)
            with dask.config.set({"distributed.deploy.lost-worker-timeout": 0}):
                super()._update_worker_status(op, msg)

    return ForgettingSLURMCluster


class SlurmDaskCluster:
    """A Dask scheduler here and ``SLURMCluster`` jobs as its workers, adaptive from zero.

    ``folder`` holds the certificates (with ``tls``), the jobs' logs and the address
    files. ``host`` is the address the compute nodes reach the scheduler at (default:
    this machine's address towards the outside); ``port`` 0 picks a free one.
    ``dashboard`` serves Dask's dashboard on port 8787 (or a free one if taken).
    """

    def __init__(self, jobs: SlurmJobs, folder: str | Path, host: str | None = None,
                 port: int = 0, tls: bool = False, idle_seconds: float = IDLE_SECONDS,
                 dashboard: bool = False):
        self.jobs = jobs
        self.folder = Path(folder).resolve()
        self.host = host or distributed.utils.get_ip()
        self.port = port
        self.tls = tls
        self.idle_seconds = idle_seconds
        self.dashboard = dashboard
        self.certificates: Certificates | None = None
        self.cluster = None

    @property
    def address(self) -> str:
        """The scheduler's address, as the event's ``dask_scheduler`` names it."""
        return self.cluster.scheduler_address

    def start(self) -> SlurmDaskCluster:
        """Start the scheduler, register the drain plugin, and let ``adapt`` submit jobs."""
        self.folder.mkdir(parents=True, exist_ok=True)
        # The site's own settings (partition, account, ``module load``...) come from Dask's
        # jobqueue configuration (~/.config/dask/jobqueue.yaml, DASK_JOBQUEUE__SLURM__*);
        # the lists are extended, not replaced.
        prologue = list(dask.config.get("jobqueue.slurm.job-script-prologue", None) or [])
        directives = list(dask.config.get("jobqueue.slurm.job-extra-directives", None) or [])
        security = None
        if self.tls:
            self.certificates = _certificates(self.folder / "certificates")
            security = _cluster_security(self.certificates)
            # dask-jobqueue passes the certificates to ``dask worker``, not this.
            prologue.append("export DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION=True")
        # A run lost with its job must fail now (the Dask worker's retry), not be submitted
        # again to a new job that may wait in the queue only to refuse a second run.
        with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
            self.cluster = _slurm_cluster_class()(
                cores=1, processes=1,  # one Dask worker thread: one run per job
                job_cpu=self.jobs.cpus_per_run,
                memory=f"{self.jobs.memory_limit_mb + WORKER_OVERHEAD_MB}MiB",
                walltime=self.jobs.walltime(),
                job_extra_directives=directives + self.jobs.job_directives(),
                job_script_prologue=prologue, job_name="ramp-runner-dask",
                log_directory=str(self.folder / "jobs"),
                local_directory=str(self.folder / "workers"),
                security=security, protocol="tls://" if self.tls else None,
                # Without the dashboard, the scheduler's HTTP routes (health, metrics)
                # still listen: on any free port rather than a busy 8787.
                scheduler_options={"host": self.host, "port": self.port,
                                   "dashboard": self.dashboard,
                                   "dashboard_address": ":8787" if self.dashboard else ":0"})
        try:
            with self.client() as client:
                client.register_plugin(DrainBeforeWalltime(self.jobs.accepting_seconds,
                                                            self.jobs.stagger_seconds))
            self.cluster.adapt(
                minimum=0, maximum=self.jobs.max_jobs, interval=ADAPT_INTERVAL_SECONDS,
                wait_count=max(1, round(self.idle_seconds / ADAPT_INTERVAL_SECONDS)),
                # Runs' durations are unknown to Dask: a tiny target asks for one worker
                # per waiting run (up to max_jobs), not one worker per 5 s of guessed work.
                target_duration="1ms")
        except BaseException:
            self.close()
            raise
        return self

    def client(self, **kwargs: Any) -> distributed.Client:
        """A client of this cluster (with the client certificate under TLS)."""
        security = self.certificates.client_security() if self.certificates else None
        return distributed.Client(self.address, security=security, set_as_default=False,
                                  timeout=START_TIMEOUT, **kwargs)

    def worker_snippet(self) -> str:
        """The ``worker:`` section to paste into the event's config.yml."""
        return worker_snippet(self.address, self.jobs.max_jobs, self.certificates)

    def close(self) -> None:
        """Cancel every job and stop the scheduler; idempotent."""
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None

    def __enter__(self) -> SlurmDaskCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _certificates(folder: Path) -> Certificates:
    """The cluster's certificates in ``folder``, made once: a cluster started again keeps
    the CA that the event's ``dask_security`` already trusts."""
    paths = [folder / name for name in CERTIFICATE_FILES]
    if all(path.is_file() for path in paths):
        return Certificates(*paths)
    return make_certificates(folder)


def _cluster_security(certificates: Certificates) -> distributed.Security:
    """The scheduler and the workers share the cluster certificate; the cluster's own
    client (adapt, the drain plugin's registration) presents it too."""
    c = certificates
    return distributed.Security(
        tls_ca_file=str(c.ca_file),
        tls_scheduler_cert=str(c.cluster_cert), tls_scheduler_key=str(c.cluster_key),
        tls_worker_cert=str(c.cluster_cert), tls_worker_key=str(c.cluster_key),
        tls_client_cert=str(c.cluster_cert), tls_client_key=str(c.cluster_key),
        require_encryption=True)


def serve(config: EventConfig, folder: str | Path, host: str | None = None,
          port: int | None = None, tls: bool = False) -> None:
    """Run the event's Slurm-backed cluster until Ctrl+C (or SIGTERM), printing the
    ``worker:`` snippet.

    The port and TLS come from the event's ``dask_scheduler`` when it names them
    (``tls://login:8786``), so that the config needs no edit; ``port`` overrides it.
    """
    scheduler = urlsplit(getattr(config.worker, "dask_scheduler", "") or "")
    jobs = SlurmJobs.from_event(config)
    cluster = SlurmDaskCluster(jobs, folder, host=host,
                               port=port if port is not None else scheduler.port or 0,
                               tls=tls or scheduler.scheme == "tls", dashboard=True)

    def announce() -> None:
        snippet = announce_address(cluster.folder, cluster.address, cluster.worker_snippet())
        print(f"Dask scheduler at {cluster.address}; Slurm jobs of 1 run each, up to "
              f"{jobs.max_jobs}, walltime {jobs.walltime()}, submitted while submissions "
              f"wait; dashboard {cluster.cluster.dashboard_link}\n"
              f"Paste into the event's config.yml (also in {snippet}):\n\n"
              f"{cluster.worker_snippet()}\nCtrl+C cancels the jobs and stops the scheduler.")

    serve_until_interrupted(cluster, announce)
