"""Where a run's overhead goes: the supervisor, the sandbox, the cgroup and the disk, per run.

The same command runs bare and under ``runner/supervise.py`` as a worker starts it, with
more of the confinement at each step, under the supervisor of ``--base`` (default: main,
before the ceilings) and the one of this tree; every run gets a fresh scratch (a copy
folder holding one file, and its tmp), removed after the run as the worker removes it
(``runner.scratch.remove_tree`` of each version, or ``shutil.rmtree`` where it has none).
The table gives the median wall time per run and its overhead over the bare command, for a
command that ends at once (``true``) and one that runs 0.3 s (where the old supervisor's
polling shows). A few rows break the cost down.

    .venv/bin/python bench/supervisor_overhead.py [--runs 20] [--base main]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, machine, write_json

from runner import scratch, supervise

COMMANDS = {"true": ["true"], "sleep 0.3": ["sleep", "0.3"]}
# What a worker asks for, with the defaults of runner.sandbox (the old supervisor has no
# --cpus).
CEILINGS = ["--memory-limit-mb", "8192", "--output-limit-mb", "1024", "--log-limit-mb", "20",
            "--max-processes", "1024"]
STEPS = ("supervisor", "+ sandbox", "+ cgroup and disk")


def step_options(step: str, folder: Path, new: bool) -> list[str]:
    """The supervisor's options of ``step`` for a run in ``folder``."""
    options = ["--watch", str(os.getpid()), "--peak-rss", str(folder / "peak"), "--reason",
               str(folder / "reason")]
    if step == "supervisor":
        return options
    options += ["--sandbox", "--tmp", str(folder / "tmp"), "--rw", str(folder / "copy")]
    if step == "+ sandbox":
        return options
    return options + CEILINGS + (["--cpus", "1"] if new else [])


def supervised(path: str, step: str, new: bool, command: list[str], python=sys.executable,
               flags=()):
    """The argv, for a scratch folder, of ``command`` under the supervisor at ``path``."""
    return lambda folder: [python, *flags, path, *step_options(step, folder, new), "--",
                           *command]


def one_run(argv_of, remove) -> float:
    """Seconds to prepare a scratch, run ``argv_of(scratch)`` and remove the scratch."""
    folder = Path(tempfile.mkdtemp(prefix="overhead-"))
    (folder / "copy").mkdir()
    (folder / "copy" / "estimator.py").write_text("# the participant's source\n")
    started = time.perf_counter()
    subprocess.run(argv_of(folder), check=True, stdout=subprocess.DEVNULL,
                   stdin=subprocess.DEVNULL)
    remove(folder)
    return time.perf_counter() - started


def medians_ms(runs: int, configurations: dict) -> dict[str, float]:
    """The median milliseconds per run of each configuration, {name: (argv_of, remove)}; the
    configurations take turns, so that a busy moment of the machine weighs on all alike."""
    times: dict[str, list[float]] = {name: [] for name in configurations}
    for _ in range(runs):
        for name, (argv_of, remove) in configurations.items():
            times[name].append(one_run(argv_of, remove))
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def base_removal(base: str, folder: Path):
    """``remove_tree`` of ``base``'s runner/scratch.py (it may unmount the run's disk), or
    ``shutil.rmtree`` where ``base`` has none."""
    shown = subprocess.run(["git", "-C", str(REPO), "show", f"{base}:runner/scratch.py"],
                           capture_output=True, check=False)
    if shown.returncode != 0:
        return shutil.rmtree
    path = folder / "base_scratch.py"
    path.write_bytes(shown.stdout)
    spec = importlib.util.spec_from_file_location("base_scratch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.remove_tree


def main() -> None:
    """Measure, print the table, write bench/results/supervisor_overhead.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--base", default="main")
    args = parser.parse_args()
    python = sys.executable
    with tempfile.TemporaryDirectory() as keep:
        old = Path(keep) / "supervise.py"
        old.write_bytes(subprocess.run(["git", "-C", str(REPO), "show",
                                        f"{args.base}:runner/supervise.py"],
                                       check=True, capture_output=True).stdout)
        versions = {"before": (str(old), base_removal(args.base, Path(keep))),
                    "now": (supervise.__file__, scratch.remove_tree)}
        configurations = {}
        for label, command in COMMANDS.items():
            configurations[f"{label} bare"] = (lambda _, c=command: c, shutil.rmtree)
            for step in STEPS:
                for version, (path, remove) in versions.items():
                    configurations[f"{label} {step} {version}"] = (
                        supervised(path, step, version == "now", command), remove)
        parts = {
            "python start (site, venv)": (lambda _: [python, "-c", "pass"], shutil.rmtree),
            "python -I -S start": (lambda _: [python, "-I", "-S", "-c", "pass"], shutil.rmtree),
            "supervisor started -I -S, all confined": (
                supervised(supervise.__file__, STEPS[-1], True, ["true"], flags=("-I", "-S")),
                scratch.remove_tree),
            "bubblewrap (+ setpriv) alone": (lambda _: supervise.bwrap_argv(
                supervise.parse(["--sandbox", "--", "true"])[0], ["true"], supervise.UID_BASE),
                shutil.rmtree),
        }
        measured = medians_ms(args.runs, {**configurations, **parts})
    print(f"per-run wall time, median of {args.runs} runs, ms (overhead over the bare command)")
    print(f"{'command':<10} {'confinement':<18} {'before':>16} {'now':>16}")
    for label in COMMANDS:
        bare = measured[f"{label} bare"]
        print(f"{label:<10} {'bare':<18} {bare:>16.1f} {bare:>16.1f}")
        for step in STEPS:
            cells = [f"{measured[f'{label} {step} {v}']:.1f} "
                     f"({measured[f'{label} {step} {v}'] - bare:+.1f})" for v in versions]
            print(f"{'':<10} {step:<18} {cells[0]:>16} {cells[1]:>16}")
    print("\nparts, ms per run")
    for name in parts:
        print(f"  {name:<42} {measured[name]:>6.1f}")
    write_json("supervisor_overhead", {"machine": machine(), "runs": args.runs,
                                       "medians_ms": measured})


if __name__ == "__main__":
    main()
