"""What hiding the test labels costs: a run through ramp-test against the same run split
into ingestion (in the sandbox) and scoring (outside), and the one-off blinding.

For each kit (the example's iris kit and tests/kits.py's regression and DataFrame kits,
each with one submission), the conda worker runs the submission to its end, as a
dispatcher slot does (setup, launch, wait, collect, teardown; the sandbox as the machine
allows), alternating the two paths over several rounds: ``ramp-test`` (with the
dispatcher's re-scoring of its saved predictions at collect) and ``hidden`` (the ingestion
program, then scoring with the labels at collect). The kit's scoring code is loaded once
beforehand, as the dispatcher does, and a first run of each path is not counted. The
table gives the median wall time per phase and per run, and the difference. The one-off
cost is ``blinded.prepare`` on an empty cache (the first call in a process imports the
kit; later calls have it) and on a cache that holds the folder already (every dispatcher
start).

    .venv/bin/python bench/hidden_labels_cost.py [--rounds 7] [--kits iris regression]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from common import machine, write_json

from runner import blinded, sandbox
from runner.config import load_event_config
from runner.local.worker import CondaEnvWorker
from tests import kits
from tests.events import EXAMPLE

PATHS = ("ramp-test", "hidden")
PHASES = ("setup", "run", "collect", "teardown")


def iris_kit(root: Path) -> tuple[Path, Path, Path]:
    """The example kit, its data prepared, and its random_forest submission."""
    shutil.copytree(EXAMPLE / "ramp-kits" / "iris", root / "kit",
                    ignore=shutil.ignore_patterns("training_output", "__pycache__"))
    (root / "data").mkdir()
    shutil.copy(EXAMPLE / "ramp-data" / "iris" / "prepare_data.py", root / "data")
    subprocess.run([sys.executable, "prepare_data.py"], cwd=root / "data", check=True,
                   capture_output=True)
    shutil.copytree(EXAMPLE / "submissions" / "random_forest",
                    root / "submissions" / "starting_kit")
    return root / "kit", root / "data", root / "submissions"


KITS = {"iris": iris_kit, "regression": kits.regression_kit,
        "dataframe": kits.dataframe_kit}


def event(root: Path, kit: str) -> Path:
    """An event of ``kit`` under ``root`` for the conda worker in this environment."""
    kit_dir, data_dir, submissions = KITS[kit](root)
    config = yaml.safe_load((EXAMPLE / "config.yml").read_text())
    config["worker"].update(kit_dir=str(kit_dir), data_dir=str(data_dir),
                            submissions_dir=str(submissions), timeout=120)
    path = root / "config.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def time_prepare(kit_dir: str, data_dir: str, folder: Path, repeats: int) -> dict:
    """Seconds of ``blinded.prepare``: on empty caches (the first one also imports what
    the kit needs) and on a cache that holds the folder."""
    empty = []
    for i in range(repeats):
        started = time.perf_counter()
        blinded.prepare(kit_dir, data_dir, folder / f"cache-{i}")
        empty.append(time.perf_counter() - started)
    started = time.perf_counter()
    blinded.prepare(kit_dir, data_dir, folder / "cache-0")
    return {"first": empty[0], "empty": statistics.median(empty[1:] or empty),
            "cached": time.perf_counter() - started}


class Phases:
    """Wall and CPU seconds of a run's phases: the CPU of this process (the dispatcher's
    side: the worker, collecting, scoring) and of its waited children (the run's tree)."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.children: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Measure the ``with`` block as phase ``name``."""
        wall, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
        try:
            yield
        finally:
            self.wall[name] = time.perf_counter() - wall
            self.cpu[name] = time.process_time() - cpu
            self.children[name] = _children_cpu() - children


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(config: dict, submission: str) -> dict[str, dict[str, float]]:
    """One run of ``submission`` by the conda worker: ``{"wall": {phase: s}, "cpu": ...,
    "children": ...}``."""
    worker = CondaEnvWorker(config, submission)
    measured = Phases()
    with measured.phase("setup"):
        worker.setup()
    try:
        with measured.phase("run"):
            worker.launch_submission()
            while worker.status == "running":
                worker.wait(worker.timeout)
        with measured.phase("collect"):
            returncode, error = worker.collect_results()
    finally:
        with measured.phase("teardown"):
            worker.kill()
            worker.teardown()
    if returncode != 0:
        raise RuntimeError(f"{submission} failed ({returncode}): {error}")
    return {"wall": measured.wall, "cpu": measured.cpu, "children": measured.children}


def measure_kit(root: Path, kit: str, rounds: int) -> dict:
    """Prepare and run ``kit`` on both paths; per-round phase times and the preparation."""
    path = event(root, kit)
    settings = load_event_config(path)
    prepare = time_prepare(settings.worker.kit_dir, settings.worker.data_dir,
                           root / "prepare", repeats=3)
    hidden = blinded.prepare(settings.worker.kit_dir, settings.worker.data_dir,
                             root / "blinded")
    base = settings.worker_dict(scratch_dir=str(root / "scratch"))
    configs = {
        "ramp-test": {**base, "prepared": CondaEnvWorker.prepare(base)},
        "hidden": {**base, "prepared": {**CondaEnvWorker.prepare(base), "blinded": hidden}},
    }
    for name in PATHS:  # not counted: the first run of each path loads what it uses
        run_once(configs[name], "starting_kit")
    runs: dict[str, list[dict]] = {p: [] for p in PATHS}
    for round_ in range(rounds):
        for name in PATHS if round_ % 2 == 0 else reversed(PATHS):
            runs[name].append(run_once(configs[name], "starting_kit"))
    return {"prepare": prepare, "runs": runs}


def medians(runs: list[dict]) -> dict[str, float]:
    """Median seconds: wall time of each phase and of the whole run; CPU of the run's
    tree, of the dispatcher's side, and both."""
    found = {phase: statistics.median(r["wall"][phase] for r in runs) for phase in PHASES}
    found["total"] = statistics.median(sum(r["wall"].values()) for r in runs)
    found["run cpu"] = statistics.median(sum(r["children"].values()) for r in runs)
    found["dispatcher cpu"] = statistics.median(sum(r["cpu"].values()) for r in runs)
    found["cpu"] = statistics.median(sum(r["children"].values()) + sum(r["cpu"].values())
                                     for r in runs)
    return found


def table(summary: dict, columns: tuple[str, ...], total: str) -> None:
    """Print one row per kit and path, and the hidden path's cost in ``total``."""
    width = {c: max(9, len(c) + 1) for c in columns}
    print(f"{'kit':<11} {'path':<10}" + "".join(f"{c:>{width[c]}}" for c in columns)
          + f"  {'cost':>17}")
    for kit, paths in summary.items():
        plain = paths["ramp-test"][total]
        for name, row in paths.items():
            cost = row[total] - plain
            said = "" if name == "ramp-test" else f"{cost:+.3f} ({100 * cost / plain:+.1f} %)"
            print(f"{kit:<11} {name:<10}"
                  + "".join(f"{row[c]:>{width[c]}.3f}" for c in columns)
                  + f"  {said:>17}")


def main() -> None:
    """Measure, print the table, write bench/results/hidden_labels_cost.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--kits", nargs="+", choices=list(KITS), default=list(KITS))
    args = parser.parse_args()
    before = machine()
    results = {}
    with tempfile.TemporaryDirectory(prefix="hidden-labels-cost-") as tmp:
        for kit in args.kits:
            results[kit] = measure_kit(Path(tmp) / kit, kit, args.rounds)
    print(f"median seconds per run of {args.rounds} rounds, conda worker, sandbox "
          f"{'on' if sandbox.available() else 'not available'}, load average "
          f"{before['load_average'][0]} before, {machine()['load_average'][0]} after")
    summary = {kit: {name: medians(found["runs"][name]) for name in PATHS}
               for kit, found in results.items()}
    table(summary, (*PHASES, "total"), "total")
    print("\nmedian CPU seconds per run: the run's process tree, the dispatcher's side "
          "(worker, collect, scoring)")
    table(summary, ("run cpu", "dispatcher cpu", "cpu"), "cpu")
    print("\none-off blinding (blinded.prepare), seconds: first in the process / "
          "empty cache / cache holding it")
    for kit, found in results.items():
        p = found["prepare"]
        print(f"{kit:<11} {p['first']:>8.3f} / {p['empty']:.3f} / {p['cached']:.4f}")
    write_json("hidden_labels_cost", {"machine": before, "rounds": args.rounds,
                                      "results": results, "medians": summary})


if __name__ == "__main__":
    main()
