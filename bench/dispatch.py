"""ramp-runner against ramp-engine 0.10.1 and a bare process pool, on the same submissions.

N short submissions of the iris example (copies of starting_kit, random_forest and
gradient_boosting under new names), 2 slots, each system launched as a process of its own
and measured from outside, alternating systems over several rounds:

    ramp-runner   runner.dispatcher.Dispatcher, conda worker (the tree as it is now)
    ramp-engine   ramp-engine 0.10.1's Dispatcher + CondaEnvWorker on a SQLite RAMP database
                  built with ramp-database's own functions (in bench/.venvs/ramp-engine)
    bare pool     ``xargs -P 2`` running the same ramp-test commands (the ideal)

All three find ramp-test through the same stand-in ``conda`` (it only answers
``conda info --envs --json``) and run the same self-timing copy of this environment's
ramp-test (common.ramp_test_wrapper), so each run's start and end are taken the same way.

    .venv/bin/python bench/dispatch.py [--submissions 24] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import BENCH, lanes, ramp_test_wrapper, read_spans, run_measured, write_json

from runner import ramptest
from runner.config import load_event_config
from runner.dispatcher import prepare_data
from runner.submissions import submit
from tests.events import EXAMPLE, GOOD_SUBMISSIONS, make_event

SLOTS = 2
SYSTEMS = ("ramp-runner", "ramp-engine", "bare pool")
ENGINE_VENV = BENCH / ".venvs" / "ramp-engine"
# ramp-engine imports boto3 at import time (its AWS worker) without requiring it.
ENGINE_PACKAGES = ("ramp-engine==0.10.1", "ramp-database==0.10.1", "ramp-utils==0.10.1",
                   "ramp-workflow", "scikit-learn", "pandas", "boto3")
RUNNER_CHILD = ("import sys; from runner.config import load_event_config; "
                "from runner.dispatcher import Dispatcher; "
                "Dispatcher(load_event_config(sys.argv[1])).run()")


def engine_python() -> Path:
    """The Python of ramp-engine's own environment, made (once) when missing."""
    python = ENGINE_VENV / "bin" / "python"
    marker = ENGINE_VENV / "installed.txt"
    if not marker.exists() or marker.read_text() != " ".join(ENGINE_PACKAGES):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(ENGINE_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *ENGINE_PACKAGES],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        marker.write_text(" ".join(ENGINE_PACKAGES))
    return python


def stand_in_conda(folder: Path, prefix: Path) -> Path:
    """A ``conda`` that only answers ``conda info --envs --json``: base is ``prefix``."""
    info = json.dumps({"root_prefix": str(prefix), "envs": [str(prefix)]})
    script = folder / "conda"
    folder.mkdir(parents=True, exist_ok=True)
    script.write_text("#!/bin/sh\n"
                      '[ "$*" = "info --envs --json" ] || { echo "stand-in conda: only '
                      '\'conda info --envs --json\'" >&2; exit 1; }\n'
                      f"echo '{info}'\n")
    script.chmod(0o755)
    return script


def workload(root: Path, count: int) -> Path:
    """``count`` submission folders named ``NN_<example>``, cycling over the good examples."""
    sources = root / "sources"
    for i in range(count):
        kind = GOOD_SUBMISSIONS[i % len(GOOD_SUBMISSIONS)]
        shutil.copytree(EXAMPLE / "submissions" / kind, sources / f"{i:02d}_{kind}",
                        ignore=shutil.ignore_patterns("training_output", "__pycache__"))
    return sources


def kit_and_data(root: Path, data: Path) -> None:
    """The example kit and its prepared data under ``root``, as RAMP lays them out."""
    shutil.copytree(EXAMPLE / "ramp-kits", root / "ramp-kits",
                    ignore=shutil.ignore_patterns("training_output", "__pycache__"))
    shutil.copytree(data.parent, root / "ramp-data" / "iris")


def timed_environment(root: Path) -> tuple[Path, Path]:
    """An environment prefix whose ramp-test times itself, and a conda naming it as base."""
    prefix = root / "env"
    ramp_test_wrapper(prefix)
    return prefix, stand_in_conda(root / "conda-bin", prefix)


def run_ramp_runner(root: Path, sources: Path, data: Path) -> dict:
    """Dispatch the workload with ramp-runner's Dispatcher and conda worker."""
    _, conda = timed_environment(root)
    config = make_event(root / "event", (), worker={"timeout": 120},
                        dispatcher={"n_workers": SLOTS, "hunger_policy": "exit"})
    shutil.copytree(data, root / "event" / "ramp-data" / "iris" / "data")
    # Queued with submit before the clock starts, as ramp-engine's database is built before
    # its dispatcher starts (a folder copied in place instead waits one quiet period).
    for source in sorted(sources.iterdir()):
        submit(load_event_config(config), source)
    env = {**os.environ, "CONDA_EXE": str(conda), "PYTHONPATH": str(BENCH.parent)}
    measured = run_measured([sys.executable, "-c", RUNNER_CHILD, str(config)], root, env)
    ledger = next((root / "event").rglob("*.sqlite3"))
    with sqlite3.connect(ledger) as db:
        scored = dict(db.execute("SELECT name, at FROM transitions WHERE to_state = 'scored'"))
        final = dict(db.execute("SELECT name, state FROM submissions"))
    runs = read_spans(Path(load_event_config(config).worker.predictions_dir))
    return {**measured, "runs": runs, "scored": scored, "final": final}


def run_ramp_engine(root: Path, sources: Path, data: Path) -> dict:
    """Dispatch the workload with ramp-engine 0.10.1 on a RAMP database built for it."""
    python = engine_python()
    _, conda = timed_environment(root)
    deployment = root / "deployment"
    kit_and_data(deployment, data)
    child = str(BENCH / "ramp_engine_child.py")
    subprocess.run([str(python), child, "build", str(deployment), str(sources)], cwd=root,
                   check=True, capture_output=True)
    env = {**os.environ, "PATH": f"{conda.parent}{os.pathsep}{os.environ['PATH']}"}
    measured = run_measured([str(python), child, "run", str(deployment), str(SLOTS)], root, env)
    rows = json.loads((deployment / "states.json").read_text())
    # ramp-test runs RAMP's copy of a submission, named submission_<id>: name it back.
    predictions = deployment / "events" / "iris_bench" / "predictions"
    runs = {rows[b]["name"]: span for b, span in read_spans(predictions).items()}
    return {**measured, "runs": runs,
            "scored": {r["name"]: r["at"]["scored"] for r in rows.values() if "scored" in r["at"]},
            "final": {r["name"]: r["final"] for r in rows.values()}}


def run_pool(root: Path, sources: Path, data: Path) -> dict:
    """Run the same ramp-test commands with ``xargs -P SLOTS``: no dispatcher at all."""
    prefix, _ = timed_environment(root)
    kit_and_data(root, data)
    submissions = root / "submissions"
    shutil.copytree(sources, submissions)
    names = root / "names.txt"
    names.write_text("".join(f"{p.name}\n" for p in sorted(submissions.iterdir())))
    argv = ramptest.command("{}", kit_dir=str(root / "ramp-kits" / "iris"),
                            data_dir=str(root / "ramp-data" / "iris"),
                            submissions_dir=str(submissions),
                            ramp_test=str(prefix / "bin" / "ramp-test"))
    env = ramptest.child_environment(1, extra_path=str(prefix / "bin"))
    measured = run_measured(["xargs", "-P", str(SLOTS), "-a", str(names), "-I{}", *argv],
                            root, env)
    runs = read_spans(submissions)
    return {**measured, "runs": runs, "scored": {}, "final": {
        n: "tested" if (submissions / n / "training_output").is_dir() else "error"
        for n in runs}}


RUNNERS = {"ramp-runner": run_ramp_runner, "ramp-engine": run_ramp_engine,
           "bare pool": run_pool}


def summarise(run: dict) -> dict:
    """Makespan, busy time, utilisation, start delays and end-to-scored of one run."""
    launched = run["started"]
    spans = sorted(run["runs"].items(), key=lambda item: item[1][0])
    # A system is done when its results are recorded (scored) and, for the pool, when its
    # last ramp-test has exited: the runs' ends are written before their interpreters'
    # half-second teardown, which the dispatchers wait for before they can collect.
    done = list(run["scored"].values()) or [launched + run["wall"]]
    makespan = max(done) - launched
    busy = sum(end - start for _, (start, end) in spans)
    lane_of = lanes([span for _, span in spans], SLOTS)
    freed = [launched] * SLOTS
    delays = []
    for (_, (start, end)), lane in zip(spans, lane_of, strict=True):
        delays.append(start - freed[lane])
        freed[lane] = end
    to_scored = [run["scored"][n] - end for n, (_, end) in spans if n in run["scored"]]
    return {
        "makespan": makespan, "busy": busy, "utilisation": busy / (SLOTS * makespan),
        "first_start": delays[0] if delays else None,
        "handoff": statistics.median(delays[SLOTS:]) if len(delays) > SLOTS else None,
        "to_scored": statistics.median(to_scored) if to_scored else None,
        "cpu": run["cpu"], "wall": run["wall"], "runs": len(spans),
        "ok": sum(state in ("scored", "tested") for state in run["final"].values()),
        "timeline": [{"name": n, "slot": lane, "start": start - launched, "end": end - launched,
                      "scored": run["scored"][n] - launched if n in run["scored"] else None}
                     for (n, (start, end)), lane in zip(spans, lane_of, strict=True)],
    }


def measure(count: int, rounds: int, systems=SYSTEMS) -> dict:
    """Run every system ``rounds`` times on the same workload, rotating their order."""
    samples: dict[str, list[dict]] = {s: [] for s in systems}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="rr-bench-dispatch-") as scratch:
        root = Path(scratch)
        sources = workload(root, count)
        data_dir = root / "data-source"
        shutil.copytree(EXAMPLE / "ramp-data" / "iris", data_dir)
        prepare_data(data_dir)
        for r in range(rounds):
            order = systems[r % len(systems):] + systems[:r % len(systems)]
            for system in order:
                if system in errors:
                    continue
                folder = root / f"round{r}" / system.replace(" ", "-")
                folder.mkdir(parents=True)
                try:
                    samples[system].append(summarise(
                        RUNNERS[system](folder, sources, data_dir / "data")))
                except Exception as error:  # noqa: BLE001 - reported, the others go on
                    errors[system] = f"{type(error).__name__}: {error}"
    return {"submissions": count, "slots": SLOTS, "rounds": rounds,
            "systems": {s: aggregate(v) for s, v in samples.items() if v}, "errors": errors}


def aggregate(samples: list[dict]) -> dict:
    """Medians over the rounds, the samples themselves, and the median round's timeline."""
    keys = ("makespan", "busy", "utilisation", "first_start", "handoff", "to_scored", "cpu",
            "wall")
    median = {k: statistics.median(s[k] for s in samples) if all(
        s[k] is not None for s in samples) else None for k in keys}
    middle = sorted(samples, key=lambda s: s["makespan"])[len(samples) // 2]
    return {"median": median, "samples": [{k: s[k] for k in (*keys, "runs", "ok")}
                                          for s in samples],
            "timeline": middle["timeline"]}


def main() -> None:
    """Print the medians per system and write bench/results/dispatch.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submissions", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    options = parser.parse_args()
    results = measure(options.submissions, options.rounds, tuple(options.systems))
    print(json.dumps({s: r["median"] for s, r in results["systems"].items()}, indent=1))
    print(json.dumps(results["errors"], indent=1))
    print(write_json("dispatch", results))


if __name__ == "__main__":
    main()
