"""Per-submission overhead of Dask workers run as Slurm jobs (runner.dask.slurm) against
the local Dask cluster, on the example event, with a one-node Slurm started here
(tests/slurm.py: needs slurm-wlm and munge).

The example's ``starting_kit`` runs one submission at a time through ``DaskWorker`` (no
dispatcher, as in bench/dask_overhead.py) on:

    dask-local   LocalCluster (processes), one worker, kit and data already cached on it
    slurm-warm   SlurmDaskCluster, its one job's Dask worker already running, kit cached
    slurm-cold   SlurmDaskCluster scaled to zero: sbatch, the job's start, the Dask
                 worker's start and registration, the kit and data shipped, then the run

One table: per configuration the median and min of the whole contract (setup -> launch ->
collect -> teardown), of ``setup`` alone, and the median overhead over ``dask-local``. The
numbers and the machine go to bench/results/slurm.json.

    .venv/bin/python bench/slurm_overhead.py [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import distributed
from common import machine, write_json
from dask_overhead import event, timed_run

from runner.dask.slurm import SlurmDaskCluster, SlurmJobs
from runner.dask.worker import DaskWorker
from tests.slurm import Slurm

# Scale to zero quickly between cold runs; long enough to keep the warm worker.
IDLE_SECONDS = 1.0
NO_JOBS_SECONDS = 60.0

Samples = dict[str, list[tuple[float, float]]]


def measure(repeat: int, root: Path, slurm: Slurm) -> Samples:
    """Every configuration's (whole run, setup) samples, ``repeat`` each."""
    results: Samples = {}
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as local:
        worker = event(root / "dask-local", worker_type="dask",
                       dask_scheduler=local.scheduler_address)
        timed_run(DaskWorker, worker)  # ship kit and data once
        results["dask-local"] = [timed_run(DaskWorker, worker) for _ in range(repeat)]
    # Sized as the event's runs: its timeout and memory limit, one job at a time.
    jobs = SlurmJobs(max_jobs=1, timeout=worker["timeout"],
                     memory_limit_mb=worker["memory_limit_mb"])
    with SlurmDaskCluster(jobs, root / "warm", host="127.0.0.1",
                          idle_seconds=3600) as cluster:
        worker = event(root / "slurm-warm", worker_type="dask", dask_scheduler=cluster.address)
        timed_run(DaskWorker, worker)  # the job's start, and the kit and data shipped
        results["slurm-warm"] = [timed_run(DaskWorker, worker) for _ in range(repeat)]
    with SlurmDaskCluster(jobs, root / "cold", host="127.0.0.1",
                          idle_seconds=IDLE_SECONDS) as cluster:
        worker = event(root / "slurm-cold", worker_type="dask", dask_scheduler=cluster.address)
        results["slurm-cold"] = []
        for _ in range(repeat):
            if slurm.wait_for_no_jobs(NO_JOBS_SECONDS):
                raise RuntimeError(f"Slurm kept its jobs: {slurm.jobs()}")
            results["slurm-cold"].append(timed_run(DaskWorker, worker))
    return results


def summary(results: Samples) -> dict[str, dict[str, float]]:
    """Per configuration: runs, median and min whole run, median setup, overhead over
    the local Dask cluster's median."""
    base = statistics.median(t for t, _ in results["dask-local"])
    found = {}
    for name, samples in results.items():
        median = statistics.median(t for t, _ in samples)
        found[name] = {"runs": len(samples), "median_s": median,
                       "min_s": min(t for t, _ in samples),
                       "setup_s": statistics.median(s for _, s in samples),
                       "overhead_s": median - base}
    return found


def table(rows: dict[str, dict[str, float]]) -> str:
    """The summary as one fixed-width table."""
    lines = [f"{'configuration':<14}{'runs':>5}{'median s':>10}{'min s':>8}{'setup s':>9}"
             f"{'over dask-local s':>19}"]
    for name, row in rows.items():
        lines.append(f"{name:<14}{row['runs']:>5}{row['median_s']:>10.2f}{row['min_s']:>8.2f}"
                     f"{row['setup_s']:>9.3f}{row['overhead_s']:>19.2f}")
    return "\n".join(lines)


def main() -> None:
    """Measure, print the table, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per configuration")
    repeat = parser.parse_args().repeat
    with tempfile.TemporaryDirectory(prefix="bench-slurm-") as root, Slurm() as slurm:
        os.environ["SLURM_CONF"] = str(slurm.conf)
        results = measure(repeat, Path(root), slurm)
    rows = summary(results)
    print(f"starting_kit of the example event, one submission at a time, "
          f"distributed {distributed.__version__}")
    print(table(rows))
    write_json("slurm", {"machine": machine(), "summary": rows,
                         "seconds": {name: [t for t, _ in samples]
                                     for name, samples in results.items()}})


if __name__ == "__main__":
    main()
