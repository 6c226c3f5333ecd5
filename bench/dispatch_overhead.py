"""How much of the slots' time goes to ramp-test: the dispatcher's overhead on the example.

Runs the example event (a fresh copy in a temporary folder) with the local worker, once with
all five submissions and once with the three good ones only (the hanging one holds a slot
for the whole timeout, which says nothing about the dispatcher), and prints:

    wall time, sum of ramp-test run times, utilisation = sum / (slots x wall time)

Run times come from the ledger (launch to end, per submission). A timeline of the runs is
written to bench/out/dispatch_timeline.png.

    .venv/bin/python bench/dispatch_overhead.py [--repeat N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runner.config import load_event_config  # noqa: E402
from runner.dispatcher import Dispatcher  # noqa: E402
from runner.ledger import Ledger  # noqa: E402
from tests.events import EXAMPLE, make_event  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
ALL = tuple(sorted(p.name for p in (EXAMPLE / "submissions").iterdir()))
GOOD = ("gradient_boosting", "random_forest", "starting_kit")


def run_once(submissions: tuple[str, ...]) -> dict:
    """Dispatch ``submissions`` of a fresh copy of the example; return the measurements."""
    with tempfile.TemporaryDirectory() as root:
        config = load_event_config(make_event(Path(root), submissions))
        started = time.monotonic()
        Dispatcher(config).run()
        wall = time.monotonic() - started
        with Ledger(config.ledger_path) as ledger:
            rows = ledger.all()
            spans = {}
            for t in ledger.transitions():
                if t.to_state == "training":
                    spans[t.name] = [t.at, None]
                elif t.from_state in ("training", "tested") and t.name in spans:
                    spans[t.name][1] = t.at
    busy = sum(r.run_time or 0.0 for r in rows)
    slots = config.dispatcher.slots
    return {"wall": wall, "busy": busy, "slots": slots, "utilisation": busy / (slots * wall),
            "gap": launch_gap(spans.values(), slots), "spans": spans}


def launch_gap(spans, slots: int) -> float:
    """Median seconds from a run's end to the launch of the run that took its slot."""
    spans = sorted(spans)
    ends = sorted(end for _, end in spans)
    gaps = []
    for start, _ in spans[slots:]:
        freed = [end for end in ends if end <= start]
        if freed:
            gaps.append(start - freed[-1])
    return sorted(gaps)[len(gaps) // 2] if gaps else float("nan")


def plot(spans: dict[str, list[float]], path: Path) -> None:
    """Draw one bar per run, from launch to end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    origin = min(start for start, _ in spans.values())
    fig, axis = plt.subplots(figsize=(8, 3))
    for row, (name, (start, end)) in enumerate(sorted(spans.items(), key=lambda s: s[1][0])):
        axis.barh(row, end - start, left=start - origin)
        axis.text(end - origin + 0.2, row, name, va="center", fontsize=8)
    axis.set_yticks([])
    axis.set_xlabel("seconds since the first launch")
    axis.set_title("example event, 2 slots: ramp-test runs")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    """Print the table (median of ``--repeat`` runs per case) and write the timeline plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{'case':<22}{'runs':>5}{'wall s':>9}{'sum run s':>11}{'slots':>7}{'util':>7}"
          f"{'launch gap ms':>15}")
    for label, submissions in (("5 examples (1 hangs)", ALL), ("3 good examples", GOOD)):
        results = sorted((run_once(submissions) for _ in range(args.repeat)),
                         key=lambda r: r["wall"])
        median = results[len(results) // 2]
        print(f"{label:<22}{args.repeat:>5}{median['wall']:>9.2f}{median['busy']:>11.2f}"
              f"{median['slots']:>7}{median['utilisation']:>7.0%}{median['gap'] * 1000:>15.0f}")
        if submissions == ALL:
            plot(median["spans"], OUT / "dispatch_timeline.png")
    print(f"timeline: {OUT / 'dispatch_timeline.png'}")


if __name__ == "__main__":
    main()
