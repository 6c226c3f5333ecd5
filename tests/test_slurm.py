"""Dask workers as Slurm jobs (runner.dask.slurm) on a real one-node Slurm started here:
tasks run inside jobs, ``adapt`` scales back to zero, a job cancelled mid-task is a lost
worker, and a worker stops taking tasks before its walltime without cutting one short."""

from __future__ import annotations

import os
import time

import distributed
import pytest

from runner.dask.slurm import SlurmDaskCluster, SlurmJobs
from tests.slurm import slurm  # noqa: F401 - the fixture

IDLE_SECONDS = 2.0
# Jobs start a Python Dask worker: seconds on a loaded machine.
JOB_START_SECONDS = 60.0


def job_of_this_worker(seconds: float = 0.0) -> str:
    """What a test task returns: the Slurm job it runs in (after ``seconds`` of work)."""
    time.sleep(seconds)
    return os.environ["SLURM_JOB_ID"]


def _jobs(**more) -> SlurmJobs:
    return SlurmJobs(**{"max_jobs": 2, "timeout": 60, "memory_limit_mb": 256, **more})


@pytest.fixture
def cluster(slurm, tmp_path):  # noqa: F811 - the fixture
    """A SLURMCluster on the test Slurm, scheduler on loopback, quick to scale down."""
    with SlurmDaskCluster(_jobs(), tmp_path / "cluster", host="127.0.0.1",
                          idle_seconds=IDLE_SECONDS) as started:
        yield started
    assert slurm.wait_for_no_jobs(10) == [], "closing the cluster left Slurm jobs"


def _wait_for_running_job(slurm, timeout: float = JOB_START_SECONDS) -> str:  # noqa: F811
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = slurm.command("squeue", "-h", "-t", "R", "-o", "%i").stdout.split()
        if running:
            return running[0]
        time.sleep(0.2)
    raise AssertionError(f"no Slurm job running after {timeout} s: {slurm.jobs()}")


def test_a_task_runs_in_a_slurm_job_and_adapt_scales_back_to_zero(slurm, cluster):  # noqa: F811
    assert slurm.jobs() == []  # nothing runs before there is work
    with cluster.client() as client:
        future = client.submit(job_of_this_worker, pure=False)
        job_id = future.result(timeout=JOB_START_SECONDS)
        assert job_id in slurm.jobs()
        # The result is the worker's unique data while a client holds it: released, the
        # idle worker may go.
        future.release()
        assert slurm.wait_for_no_jobs(IDLE_SECONDS + 10) == []
        assert client.scheduler_info()["workers"] == {}


def test_a_job_cancelled_mid_task_fails_the_task_as_a_lost_worker(slurm, cluster):  # noqa: F811
    with cluster.client() as client:
        future = client.submit(job_of_this_worker, 60, pure=False)
        job_id = _wait_for_running_job(slurm)
        client.wait_for_workers(1, timeout=JOB_START_SECONDS)
        time.sleep(0.5)  # the task has started on the job's worker
        slurm.command("scancel", job_id)
        with pytest.raises(distributed.KilledWorker):
            future.result(timeout=30)
        # Not submitted again to a new job: the Dask worker reports a retry instead.
        assert slurm.wait_for_no_jobs(IDLE_SECONDS + 10) == []


def test_a_worker_past_its_lifetime_finishes_its_task_then_leaves(slurm, tmp_path):  # noqa: F811
    jobs = _jobs(lifetime=1.0)
    with SlurmDaskCluster(jobs, tmp_path / "cluster", host="127.0.0.1",
                          idle_seconds=60) as cluster, cluster.client() as client:
        # Longer than the lifetime: Dask's own --lifetime would cancel it halfway.
        first = client.submit(job_of_this_worker, 4, pure=False)
        first_job = first.result(timeout=JOB_START_SECONDS)
        # Released as the dispatcher does once it has the result: the drained worker
        # leaves with its job long before the idle timeout; the next task gets a new job.
        first.release()
        assert slurm.wait_for_no_jobs(10) == []
        # Forgotten, not kept to be submitted again whether or not a task waits.
        assert cluster.cluster.worker_spec == {}
        second = client.submit(job_of_this_worker, pure=False)
        assert second.result(timeout=JOB_START_SECONDS) != first_job
    assert slurm.wait_for_no_jobs(10) == []
