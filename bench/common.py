"""What the benchmarks share: the machine they ran on, a child measured from outside, results."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def machine() -> dict:
    """What the numbers came from: CPUs, memory, Python, and how busy the machine was."""
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def run_measured(argv: list[str], cwd: Path, env: dict[str, str] | None = None,
                 log: Path | None = None) -> dict:
    """Run ``argv`` to its end; return its wall time and its own CPU time, measured from outside.

    The CPU time is the process's own (user + system, all its threads), read once it has
    exited but before it is reaped, so the runs it started are not counted in it.
    """
    log = log or cwd / "child.log"
    with open(log, "wb") as output:
        started = time.time()
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=output,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
        ended = time.time()
        times = psutil.Process(process.pid).cpu_times()
        returncode = process.wait()
    if returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(map(str, argv[:3]))} exited with {returncode}:\n{tail}")
    return {"started": started, "wall": ended - started, "cpu": times.user + times.system}


SPAN_FILE = "bench_span.txt"


def ramp_test_wrapper(prefix: Path) -> Path:
    """Make ``prefix/bin/ramp-test``: this environment's ramp-test, timing itself.

    Every system runs this same script, so each run is timed the same way: from the
    creation of its process to the end of ramp-test, written as ``start end``
    (``time.time()`` seconds) into ``training_output/bench_span.txt``, the one folder a
    sandboxed run may write and every system keeps. It is ramp-workflow's own console
    script plus the timing: no extra process.
    """
    script = prefix / "bin" / "ramp-test"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys, time\n"
        "from pathlib import Path\n"
        "try:\n"
        "    import psutil\n"
        "    started = psutil.Process().create_time()\n"
        "except Exception:\n"
        "    started = time.time()\n"
        "from rampwf.utils.cli.testing import start\n"
        "try:\n"
        "    start()\n"
        "finally:\n"
        "    a = sys.argv\n"
        "    out = (Path(a[a.index('--ramp-submission-dir') + 1]) / a[a.index('--submission') + 1]"
        " / 'training_output')\n"
        "    if out.is_dir():\n"
        f"        (out / '{SPAN_FILE}').write_text(f'{{started}} {{time.time()}}')\n")
    script.chmod(0o755)
    return script


def read_spans(outputs: Path) -> dict[str, tuple[float, float]]:
    """``submission -> (start, end)`` from the span files under ``outputs/<submission>/``."""
    found = {}
    for span in outputs.glob(f"*/{SPAN_FILE}"):
        start, end = span.read_text().split()
        found[span.parent.name] = (float(start), float(end))
    for span in outputs.glob(f"*/training_output/{SPAN_FILE}"):
        start, end = span.read_text().split()
        found[span.parent.parent.name] = (float(start), float(end))
    return found


def lanes(spans: list[tuple[float, float]], slots: int) -> list[int]:
    """The slot each run occupied: the first slot free at its start (runs sorted by start)."""
    free_at = [float("-inf")] * slots
    found = []
    for start, end in spans:
        lane = min(range(slots), key=lambda i: (free_at[i] > start + 1e-3, free_at[i]))
        free_at[lane] = end
        found.append(lane)
    return found


def write_json(name: str, data: dict) -> Path:
    """Write ``bench/results/<name>.json``; return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return path
