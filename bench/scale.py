"""The dispatcher's own cost as the queue grows, and how soon a new submission starts.

With a worker that finishes at once (instant_worker.py, registered as a third-party worker
type through the ``ramp_runner.workers`` entry points), for 100, 1,000 and 10,000 queued
submission folders: the dispatcher's wall and CPU time per submission (around
``Dispatcher.run``, in a process of its own) and the process's peak RSS; each size laid
out flat (every submission its own team, as before team folders) and in ``--teams`` team
folders (``submissions/<team>/<submission>``, the fair queue taking turns between them).
Then:

- arrival to start: with ``hunger_policy: None`` and a free slot, one folder dropped into
  ``submissions_dir`` at a time (staged under a hidden name and renamed, as ``submit``
  does); the time until its worker's ``setup`` begins;
- a profile (cProfile, every thread) of the run at 1,000: where the time goes.

    .venv/bin/python bench/scale.py [--sizes 100 1000 10000] [--teams 20] [--drops 5]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import BENCH, REPO, write_json

from runner import ramptest
from runner.config import load_event_config
from runner.dispatcher import Dispatcher, prepare_data
from runner.states import FINAL_STATES
from runner.submissions import QUIET_SECONDS
from tests.events import make_event, register_worker

WORKER_TYPE = "bench-instant"
PROFILE_SIZE = 1000
PROFILE_TOP = 25
WAITS = ("acquire", "SimpleQueue", "sleep", "(wait)", "waitpid", "select")


def real_output(root: Path) -> Path:
    """The training_output of one real ramp-test run of the example's starting kit."""
    event = load_event_config(make_event(root, ("starting_kit",)))
    prepare_data(event.worker.data_dir)
    argv = ramptest.command("starting_kit", kit_dir=event.worker.kit_dir,
                            data_dir=event.worker.data_dir,
                            submissions_dir=event.worker.submissions_dir,
                            ramp_test=str(Path(sys.executable).parent / "ramp-test"))
    subprocess.run(argv, check=True, capture_output=True)
    return Path(event.worker.submissions_dir) / "starting_kit" / "training_output"


def event(root: Path, output: Path, data: Path, queued: int, hunger_policy,
          teams: int = 0) -> Path:
    """An event run by the instant worker with ``queued`` empty submission folders, flat
    or dealt round ``teams`` team folders."""
    config = make_event(root, (), worker={"worker_type": WORKER_TYPE,
                                          "bench_output": str(output)},
                        dispatcher={"hunger_policy": hunger_policy, "n_workers": 2})
    shutil.copytree(data, root / "ramp-data" / "iris" / "data")
    submissions = root / "submissions"
    submissions.mkdir(exist_ok=True)
    for i in range(queued):
        team = f"team{i % teams:03d}/" if teams else ""
        (submissions / f"{team}s{i:05d}").mkdir(parents=True)
    return config


def child(site: Path, *arguments: str) -> dict:
    """Run this script's ``child`` side in a fresh process; return what it printed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(BENCH), str(REPO)])}
    completed = subprocess.run([sys.executable, __file__, "child", *arguments], env=env,
                               capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"scale child {arguments[0]} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.splitlines()[-1])


# -- the child side: runs in its own process --------------------------------------------

def run_queue(config_path: str, budget: float, profile_out: str | None = None) -> dict:
    """Dispatch the queue, for at most ``budget`` seconds; wall, CPU and memory around
    ``Dispatcher.run`` and how many submissions it finished."""
    config = load_event_config(config_path)
    profiles = []
    if profile_out:
        original = threading.Thread.run

        def profiled(thread):
            profile = cProfile.Profile(time.thread_time)
            profiles.append(profile)
            profile.runcall(original, thread)

        threading.Thread.run = profiled
        profiles.append(cProfile.Profile(time.thread_time))
        profiles[-1].enable()
    dispatcher = Dispatcher(config)
    # A slow dispatcher is measured on the submissions it finishes within the budget: with
    # the queue still nearly full, the cost per submission is that of the full queue.
    timer = threading.Timer(budget, dispatcher.stop)
    timer.start()
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    dispatcher.run()
    wall = time.perf_counter() - started
    timer.cancel()
    after = resource.getrusage(resource.RUSAGE_SELF)
    if profile_out:
        profiles[0].disable()
        stats = pstats.Stats(profiles[0])
        for profile in profiles[1:]:
            stats.add(profile)
        stats.dump_stats(profile_out)
    from instant_worker import InstantWorker

    # The process's CPU less the instant worker's own (its output links): the dispatcher's.
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
           - InstantWorker.own_cpu)
    with sqlite3.connect(config.ledger_path) as db:
        states = dict(db.execute("SELECT state, COUNT(*) FROM submissions GROUP BY state"))
    done = sum(n for state, n in states.items() if state in FINAL_STATES)
    return {"queued": sum(states.values()), "done": done, "states": states, "wall": wall,
            "cpu": cpu, "worker_cpu": InstantWorker.own_cpu, "peak_rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM, not ru_maxrss, which Linux carries
    over from the parent across fork and exec (a big parent made every child look big)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def arrival_latency(config_path: str, drops: int) -> dict:
    """Drop folders one at a time into an idle dispatcher; seconds until each one's setup."""
    from instant_worker import InstantWorker

    config = load_event_config(config_path)
    dispatcher = Dispatcher(config)
    thread = threading.Thread(target=dispatcher.run)
    thread.start()
    submissions = Path(config.worker.submissions_dir)
    rng = random.Random(13)
    latencies = []
    try:
        for k in range(drops):
            # Land at different points of any rescan period.
            time.sleep(1.0 + rng.uniform(0, 2.0))
            staging = submissions / f".late{k}.incoming"
            staging.mkdir(parents=True)
            dropped = time.time()
            staging.rename(submissions / f"late{k}")
            deadline = dropped + 15
            while f"late{k}" not in InstantWorker.setup_started and time.time() < deadline:
                time.sleep(0.002)
            started = InstantWorker.setup_started.get(f"late{k}")
            latencies.append(None if started is None else started - dropped)
    finally:
        dispatcher.stop()
        thread.join(60)
    return {"latencies": latencies}


def child_main(arguments: list[str]) -> None:
    """The child process: one measurement, printed as one JSON line."""
    mode, config_path, extra = arguments[0], arguments[1], arguments[2:]
    if mode == "queue":
        result = run_queue(config_path, float(extra[0]), extra[1] if extra[1:] else None)
    else:
        result = arrival_latency(config_path, int(extra[0]))
    print(json.dumps(result))


# -- the parent side ----------------------------------------------------------------------

def top_entries(profile: Path, count: int = PROFILE_TOP) -> list[dict]:
    """The functions with the most time of their own, all threads merged."""
    stats = pstats.Stats(str(profile))
    rows = []
    for (filename, line, function), (_, calls, own, cumulative, _) in stats.stats.items():
        where = filename.replace(str(REPO) + "/", "").replace(sys.prefix + "/", "")
        rows.append({"function": f"{where}:{line}({function})", "calls": calls,
                     "own_s": round(own, 4), "cumulative_s": round(cumulative, 4)})
    # Threads mostly wait: the waits are not the dispatcher's work.
    rows = [r for r in rows if not any(w in r["function"] for w in WAITS)]
    return sorted(rows, key=lambda r: r["own_s"], reverse=True)[:count]


def measure(sizes: list[int], drops: int, budget: float, profile: bool = True,
            teams: int = 0) -> dict:
    """Every measurement of this module, as one dict; each queue runs ``budget`` s at most."""
    with tempfile.TemporaryDirectory(prefix="rr-bench-scale-") as scratch:
        root = Path(scratch)
        site = root / "site"
        register_worker(site, WORKER_TYPE, "instant_worker:InstantWorker")
        output = real_output(root / "real")
        data = root / "real" / "ramp-data" / "iris" / "data"
        rows = []
        for size in sizes:
            for layout_teams in dict.fromkeys((0, teams)):
                config = event(root / f"queue{size}-{layout_teams}", output, data, size, "exit",
                               layout_teams)
                # A queue that built up, not one copied in this instant: folders created in
                # place are taken once quiet (runner.submissions), a wait that is no cost.
                time.sleep(QUIET_SECONDS)
                result = child(site, "queue", str(config), str(budget))
                result["teams"] = layout_teams
                result["wall_ms_per_submission"] = 1000 * result["wall"] / result["done"]
                result["cpu_ms_per_submission"] = 1000 * result["cpu"] / result["done"]
                result["worker_cpu_ms_per_submission"] = (1000 * result["worker_cpu"]
                                                          / result["done"])
                rows.append(result)
        latency = child(site, "latency", str(event(root / "latency", output, data, 0, None)),
                        str(drops))
        top = []
        if profile:
            config = event(root / "profiled", output, data, PROFILE_SIZE, "exit")
            time.sleep(QUIET_SECONDS)
            child(site, "queue", str(config), str(budget), str(root / "profile.pstats"))
            top = top_entries(root / "profile.pstats")
    return {"sizes": rows, "arrival_to_start": latency["latencies"],
            "profile": {"queued": PROFILE_SIZE, "top_own_time": top}}


def main() -> None:
    """Print the table and write bench/results/scale.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--teams", type=int, default=20,
                        help="team folders of the second layout (0: flat only)")
    parser.add_argument("--drops", type=int, default=5)
    parser.add_argument("--budget", type=float, default=120,
                        help="seconds each queue may run (the rate is taken over those done)")
    options = parser.parse_args()
    results = measure(options.sizes, options.drops, options.budget, teams=options.teams)
    print(f"{'queued':>8}{'teams':>7}{'done':>7}{'wall ms/sub':>13}{'cpu ms/sub':>12}"
          f"{'worker cpu ms/sub':>19}{'peak RSS MiB':>14}")
    for row in results["sizes"]:
        teams = row["teams"] or "flat"
        print(f"{row['queued']:>8}{teams:>7}{row['done']:>7}"
              f"{row['wall_ms_per_submission']:>13.2f}"
              f"{row['cpu_ms_per_submission']:>12.2f}"
              f"{row['worker_cpu_ms_per_submission']:>19.2f}{row['peak_rss_mib']:>14.1f}")
    print("arrival to start (s):", results["arrival_to_start"])
    for row in results["profile"]["top_own_time"][:15]:
        print(f"{row['own_s']:>9.3f}{row['cumulative_s']:>9.3f}{row['calls']:>9}  "
              f"{row['function']}")
    print(write_json("scale", results))


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        child_main(sys.argv[2:])
    else:
        main()
