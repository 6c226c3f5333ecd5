"""What the sandbox costs: wall time of the example event with ``sandbox: off`` and ``auto``.

The example event (examples/iris, its five submissions, the hanging one included, with its
20 s timeout, 2 slots) is dispatched to its end by ``invoke dispatch`` as a process of its
own, alternating the two settings over several rounds; the table gives the median wall
time per setting and per submission, and the difference.

    .venv/bin/python bench/sandbox_cost.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, machine, write_json

from runner import sandbox
from runner.ledger import Ledger
from tests.events import EXAMPLE, make_event

SETTINGS = ("off", "auto")
SUBMISSIONS = tuple(sorted(p.name for p in (EXAMPLE / "submissions").iterdir()))


def dispatch_once(root: Path, setting: str) -> tuple[float, dict[str, str]]:
    """Dispatch a fresh copy of the example event; return (wall seconds, final states)."""
    path = make_event(root, SUBMISSIONS, worker={"sandbox": setting})
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(REPO), "dispatch",
                    "--event-config", str(path)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    wall = time.monotonic() - started
    with Ledger(path.parent / "ramp-runner.sqlite3") as ledger:
        return wall, {s.name: s.state for s in ledger.all()}


def main() -> None:
    """Measure, print the table, write bench/results/sandbox_cost.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not sandbox.available():
        sys.exit(f"the sandbox does not work here: {sandbox.probe()[1]}")
    walls: dict[str, list[float]] = {s: [] for s in SETTINGS}
    states = {}
    with tempfile.TemporaryDirectory(prefix="sandbox-cost-") as tmp:
        for round_ in range(args.rounds):
            for setting in SETTINGS if round_ % 2 == 0 else reversed(SETTINGS):
                wall, states[setting] = dispatch_once(Path(tmp) / f"{setting}-{round_}",
                                                      setting)
                walls[setting].append(wall)
    if states["off"] != states["auto"]:
        sys.exit(f"the two settings disagree on the outcomes: {states}")
    medians = {s: statistics.median(w) for s, w in walls.items()}
    print(f"example event: {len(SUBMISSIONS)} submissions, 2 slots, {args.rounds} rounds "
          f"(median wall time of the whole event)")
    print(f"{'sandbox':<8} {'event s':>8} {'per submission s':>17}   rounds")
    for setting in SETTINGS:
        rounds = " ".join(f"{w:.1f}" for w in walls[setting])
        print(f"{setting:<8} {medians[setting]:>8.1f} "
              f"{medians[setting] / len(SUBMISSIONS):>17.2f}   {rounds}")
    cost = medians["auto"] - medians["off"]
    print(f"{'cost':<8} {cost:>+8.1f} {cost / len(SUBMISSIONS):>+17.2f}   "
          f"({100 * cost / medians['off']:+.1f} %)")
    write_json("sandbox_cost", {"machine": machine(), "walls": walls, "medians": medians,
                                "states": states["auto"]})


if __name__ == "__main__":
    main()
