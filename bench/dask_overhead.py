"""Per-submission overhead of ``worker_type: dask`` over the local worker, on the example kit.

Runs the example's ``starting_kit`` one submission at a time (no dispatcher, so only the
worker's own cost shows) with:

    local        CondaEnvWorker, ramp-test in this Python environment
    dask-cold    LocalCluster (processes): first run on a worker, kit and data shipped
    dask-local   LocalCluster (processes), kit and data already cached on the worker
    dask-tcp     ``dask scheduler`` + ``dask worker`` subprocesses on loopback, own folder
    dask-tls     the same with TLS (certificates made for the run)

and prints, per configuration, the median and min of the whole contract (setup -> launch
-> collect -> teardown), of ``setup`` alone (packing + connecting), and the median
overhead over ``local``. A bar chart goes to bench/out/dask_overhead.png.

    .venv/bin/python bench/dask_overhead.py [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import distributed  # noqa: E402

from runner.config import load_event_config  # noqa: E402
from runner.dask.cluster import LoopbackCluster  # noqa: E402
from runner.dask.worker import DaskWorker  # noqa: E402
from runner.dispatcher import prepare_data  # noqa: E402
from runner.local.worker import CondaEnvWorker  # noqa: E402
from tests.events import make_event  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
REPO = Path(__file__).resolve().parent.parent
SUBMISSION = "starting_kit"


def timed_run(worker_class, worker_dict: dict) -> tuple[float, float]:
    """Run the contract once; return (total seconds, setup seconds)."""
    worker = worker_class(worker_dict, SUBMISSION)
    started = time.perf_counter()
    worker.setup()
    set_up = time.perf_counter()
    try:
        worker.launch_submission()
        while worker.status == "running":
            worker.wait(worker.timeout - worker.elapsed + 0.1)
        returncode, error_msg = worker.collect_results()
    finally:
        worker.teardown()
    if returncode != 0:
        raise RuntimeError(f"{worker_class.__name__}: {error_msg}")
    return time.perf_counter() - started, set_up - started


def event(root: Path, **worker) -> dict:
    """A fresh copy of the example event with ``worker`` keys; its worker dict."""
    config = load_event_config(make_event(root, submissions=(SUBMISSION,), worker=worker))
    prepare_data(config.worker.data_dir)
    return config.worker_dict()


def dask_section(cluster: LoopbackCluster) -> dict:
    section = {"worker_type": "dask", "dask_scheduler": cluster.address}
    if cluster.certificates:
        c = cluster.certificates
        section["dask_security"] = {"tls_ca_file": str(c.ca_file),
                                    "tls_client_cert": str(c.client_cert),
                                    "tls_client_key": str(c.client_key)}
    return section


def measure(repeat: int, root: Path) -> dict[str, list[tuple[float, float]]]:
    """Every configuration's (total, setup) samples."""
    results: dict[str, list[tuple[float, float]]] = {}
    local = event(root / "local")
    timed_run(CondaEnvWorker, local)  # warm the page cache and imports, as for the others
    results["local"] = [timed_run(CondaEnvWorker, local) for _ in range(repeat)]
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster:
        worker = event(root / "dask-local", worker_type="dask",
                       dask_scheduler=cluster.scheduler_address)
        results["dask-cold"] = [timed_run(DaskWorker, worker)]
        results["dask-local"] = [timed_run(DaskWorker, worker) for _ in range(repeat)]
    for name, tls in (("dask-tcp", False), ("dask-tls", True)):
        with LoopbackCluster(root / name / "cluster", workers=1, tls=tls, cwd=root / name,
                             env={"PYTHONPATH": str(REPO)}) as cluster:
            worker = event(root / name / "event", **dask_section(cluster))
            timed_run(DaskWorker, worker)  # ship kit and data once
            results[name] = [timed_run(DaskWorker, worker) for _ in range(repeat)]
    return results


def table(results: dict[str, list[tuple[float, float]]]) -> str:
    """The measurements as a fixed-width table."""
    rows = summary(results)
    base = rows["local"]["median_s"]
    lines = [f"{'configuration':<13}{'runs':>5}{'median s':>10}{'min s':>8}"
             f"{'setup s':>9}{'overhead s':>12}{'overhead':>10}"]
    for name, row in rows.items():
        fastest = min(t for t, _ in results[name])
        lines.append(f"{name:<13}{row['runs']:>5}{row['median_s']:>10.2f}{fastest:>8.2f}"
                     f"{row['setup_s']:>9.3f}{row['overhead_s']:>12.2f}"
                     f"{row['overhead_s'] / base:>10.0%}")
    return "\n".join(lines)


def summary(results: dict[str, list[tuple[float, float]]]) -> dict[str, dict[str, float]]:
    """Per configuration: runs, median whole run and setup, and the median overhead over local."""
    base = statistics.median(t for t, _ in results["local"])
    found = {}
    for name, samples in results.items():
        median = statistics.median(t for t, _ in samples)
        found[name] = {"runs": len(samples), "median_s": median,
                       "setup_s": statistics.median(s for _, s in samples),
                       "overhead_s": median - base}
    return found


def plot(results: dict[str, list[tuple[float, float]]], path: Path) -> None:
    """Bar chart of the median time per configuration, with the setup part shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    totals = [statistics.median(t for t, _ in results[n]) for n in names]
    setups = [statistics.median(s for _, s in results[n]) for n in names]
    figure, axes = plt.subplots(figsize=(7, 3.5))
    axes.bar(names, totals, color="#8fb3d9", label="whole run")
    axes.bar(names, setups, color="#2b5d8c", label="setup (pack + connect)")
    axes.set_ylabel("seconds per submission (median)")
    axes.set_title(f"{SUBMISSION} of the iris example, one at a time")
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per configuration")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        results = measure(options.repeat, Path(root))
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"distributed {distributed.__version__}")
    print(table(results))
    plot(results, OUT / "dask_overhead.png")
    print(f"plot: {OUT / 'dask_overhead.png'}")


if __name__ == "__main__":
    main()
