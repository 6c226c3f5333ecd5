"""Per-task overhead of Dask workers run as Slurm jobs (runner.dask.slurm) against a
LocalCluster, on a one-node Slurm started here (tests/slurm.py: needs slurm-wlm and munge).

    local-warm   LocalCluster, one single-thread worker already running
    slurm-warm   SlurmDaskCluster, its one job's worker already running
    slurm-cold   SlurmDaskCluster scaled to zero: sbatch, the job's start, the Dask
                 worker's start and registration, then the task

Each row is the time from ``submit`` to the result of a task that does nothing, median
and min over the repeats. The numbers and the machine go to bench/results/slurm.json.

    .venv/bin/python bench/slurm_overhead.py [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import distributed
from common import machine, write_json

from runner.dask.slurm import SlurmDaskCluster, SlurmJobs
from tests.slurm import Slurm

# Scale to zero quickly between cold runs; long enough to keep the warm worker.
IDLE_SECONDS = 1.0
JOB_START_SECONDS = 120.0


def nothing() -> None:
    """The measured task."""


def round_trip(client: distributed.Client) -> float:
    """Seconds from submitting a task that does nothing to having its result."""
    started = time.perf_counter()
    client.submit(nothing, pure=False).result(timeout=JOB_START_SECONDS)
    return time.perf_counter() - started


def measure(repeat: int, folder: Path, slurm: Slurm) -> dict[str, list[float]]:
    """The round trips of every configuration, ``repeat`` each."""
    times: dict[str, list[float]] = {}
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as local, \
            distributed.Client(local, set_as_default=False) as client:
        round_trip(client)  # the first task also imports the function's module
        times["local-warm"] = [round_trip(client) for _ in range(repeat)]
    jobs = SlurmJobs(max_jobs=1, timeout=600, memory_limit_mb=256)
    with SlurmDaskCluster(jobs, folder / "cold", host="127.0.0.1",
                          idle_seconds=IDLE_SECONDS) as cluster, cluster.client() as client:
        times["slurm-cold"] = []
        for _ in range(repeat):
            slurm.wait_for_no_jobs(60)
            times["slurm-cold"].append(round_trip(client))
    with SlurmDaskCluster(jobs, folder / "warm", host="127.0.0.1",
                          idle_seconds=3600) as cluster, cluster.client() as client:
        round_trip(client)
        times["slurm-warm"] = [round_trip(client) for _ in range(repeat)]
    return times


def main() -> None:
    """Measure, print the table, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    repeat = parser.parse_args().repeat
    with tempfile.TemporaryDirectory(prefix="bench-slurm-") as folder, Slurm() as slurm:
        os.environ["SLURM_CONF"] = str(slurm.conf)
        times = measure(repeat, Path(folder), slurm)
    print(f"{'configuration':<14}{'median s':>10}{'min s':>10}{'runs':>6}")
    for name, values in times.items():
        print(f"{name:<14}{statistics.median(values):>10.3f}{min(values):>10.3f}"
              f"{len(values):>6}")
    write_json("slurm", {"machine": machine(), "seconds": times})


if __name__ == "__main__":
    main()
