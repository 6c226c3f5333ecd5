"""Every benchmark in one report: one markdown table, bench/results/*.json, a Gantt chart.

Parts (each measured against the tree as it is when this runs):

    dispatch   ramp-runner, ramp-engine 0.10.1, bare pool on N iris submissions (dispatch.py)
    scale      the dispatcher's cost per submission at 100/1,000/10,000 queued, arrival to
               start with a free slot, and a profile (scale.py)
    remote     one SSHWorker submission and transfer throughput (remote_transfer.py)
    dask       the Dask worker's overhead over a local run (dask_overhead.py)

A part that fails is reported with its error; the others still run.

    .venv/bin/python bench/report.py [--quick]     (or: invoke bench [--quick])
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import dask_overhead
import dispatch
import remote_transfer
import scale
from common import RESULTS, machine, write_json

# What each part runs, full and --quick (quick: about 3 minutes on 2 cores).
SETTINGS = {
    "full": {"submissions": 24, "rounds": 3, "sizes": [100, 1000, 10000], "drops": 5,
             "budget": 120.0, "size_mib": 64, "repeat": 3, "dask_repeat": 5},
    "quick": {"submissions": 6, "rounds": 1, "sizes": [100, 1000], "drops": 3,
              "budget": 15.0, "size_mib": 8, "repeat": 1, "dask_repeat": 1},
}
COLUMNS = ("ramp-runner", "ramp-engine", "bare pool")
HEADERS = ("measure", "ramp-runner", "ramp-engine 0.10.1", "bare pool (ideal)")
KIND_COLOURS = {"starting_kit": "#8fb3d9", "random_forest": "#5b9e5b",
                "gradient_boosting": "#d9a05b"}


def run_parts(settings: dict) -> dict:
    """Run every part; each one's results, or the error that stopped it."""
    parts = {
        "dispatch": lambda: dispatch.measure(settings["submissions"], settings["rounds"]),
        "scale": lambda: scale.measure(settings["sizes"], settings["drops"],
                                       settings["budget"]),
        "remote": lambda: remote_transfer.measure(settings["size_mib"], settings["repeat"]),
        "dask": lambda: dask_part(settings["dask_repeat"]),
    }
    results = {}
    for name, run in parts.items():
        started = time.monotonic()
        try:
            results[name] = run()
        except Exception as error:  # noqa: BLE001 - one part's failure is reported
            results[name] = {"error": f"{type(error).__name__}: {error}",
                             "traceback": traceback.format_exc()}
        results[name]["seconds"] = round(time.monotonic() - started, 1)
        write_json(name, results[name])
    return results


def dask_part(repeat: int) -> dict:
    """dask_overhead's samples and its per-configuration summary."""
    with tempfile.TemporaryDirectory(prefix="rr-bench-dask-") as root:
        samples = dask_overhead.measure(repeat, Path(root))
    return {"repeat": repeat, "samples": samples, "summary": dask_overhead.summary(samples)}


def _s(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def dispatch_rows(part: dict) -> list[list[str]]:
    """Table rows of the dispatch part: one column per system."""
    if "error" in part:
        return [["dispatch benchmark", part["error"], "", ""]]
    systems = part["systems"]
    medians = {s: systems[s]["median"] if s in systems else None for s in COLUMNS}
    ideal = medians["bare pool"]

    def row(label: str, cell) -> list[str]:
        cells = []
        for system in COLUMNS:
            if medians[system] is None:
                cells.append(part["errors"].get(system, "n/a").splitlines()[0][:120])
            else:
                cells.append(cell(medians[system]))
        return [label, *cells]

    def makespan(m: dict) -> str:
        ratio = f" ({m['makespan'] / ideal['makespan']:.2f}x)" if ideal else ""
        return f"{m['makespan']:.1f}{ratio}"

    def cpu(m: dict) -> str:
        return f"{m['cpu']:.2f} ({m['cpu'] / m['makespan']:.1%})"

    n, rounds = part["submissions"], part["rounds"]
    return [
        row(f"makespan s, {n} iris submissions, 2 slots (x bare pool), median of {rounds}",
            makespan),
        row("sum of ramp-test run times s", lambda m: f"{m['busy']:.1f}"),
        row("utilisation = sum / (2 x makespan)", lambda m: f"{m['utilisation']:.0%}"),
        row("launch -> first ramp-test start s", lambda m: _s(m["first_start"])),
        row("slot freed -> next ramp-test start s (median)", lambda m: _s(m["handoff"])),
        row("ramp-test end -> scored s (median)",
            lambda m: _s(m["to_scored"]) if m["to_scored"] is not None else "no scoring"),
        row("orchestrating process CPU s (% of makespan)", cpu),
    ]


def scale_rows(part: dict) -> list[list[str]]:
    """Table rows of the scale part (ramp-runner only)."""
    if "error" in part:
        return [["dispatcher scale benchmark", part["error"], "", ""]]
    sizes = part["sizes"]
    label = " / ".join(f"{r['queued']:,}" for r in sizes)
    costs = " / ".join(f"{r['wall_ms_per_submission']:.1f}" for r in sizes)
    cpu = " / ".join(f"{r['cpu_ms_per_submission']:.1f}" for r in sizes)
    worker = " / ".join(f"{r.get('worker_cpu_ms_per_submission', 0):.1f}" for r in sizes)
    rss = " / ".join(f"{r['peak_rss_mib']:.0f}" for r in sizes)
    partial = [r for r in sizes if r["done"] < r["queued"]]
    note = (" (" + ", ".join(f"{r['done']:,} of {r['queued']:,} done in the time budget"
                             for r in partial) + ")") if partial else ""
    latencies = [x for x in part["arrival_to_start"] if x is not None]
    missed = len(part["arrival_to_start"]) - len(latencies)
    latency = (f"{statistics.median(latencies):.3f} (max {max(latencies):.3f}"
               f"{f', {missed} never started' if missed else ''})") if latencies else "never"
    return [
        [f"dispatcher wall ms per submission, instant worker, {label} queued{note}", costs,
         "-", "-"],
        [f"dispatcher CPU ms per submission, {label} queued (the instant worker's own "
         f"output link, not counted: {worker})", cpu, "-", "-"],
        [f"dispatcher peak RSS MiB, {label} queued", rss, "-", "-"],
        [f"arrival -> start with a free slot s (median of {len(part['arrival_to_start'])})",
         latency, "-", "-"],
    ]


def remote_rows(part: dict) -> list[list[str]]:
    """Table rows of the SSH part; OpenSSH's tar | ssh stands in the ideal column."""
    if "error" in part:
        return [["SSH worker benchmark", part["error"].splitlines()[0][:120], "", ""]]
    c = part["one_submission"]
    ours, tar = part["throughput"]
    return [
        ["SSH worker, one iris submission: connections / round trips / KiB sent / received",
         f"{c['connections']} / {c['round trips']} / {c['bytes sent'] / 1024:.0f} / "
         f"{c['bytes received'] / 1024:.0f}", "-", "-"],
        [f"SSH transfer of {part['size_mib']} MiB, MiB/s up / down (ideal: tar | ssh)",
         f"{ours['up_mib_s']:.0f} / {ours['down_mib_s']:.0f}", "-",
         f"{tar['up_mib_s']:.0f} / {tar['down_mib_s']:.0f}"],
    ]


def dask_rows(part: dict) -> list[list[str]]:
    """Table rows of the Dask part; the local run stands in the ideal column."""
    if "error" in part:
        return [["Dask worker benchmark", part["error"].splitlines()[0][:120], "", ""]]
    summary = part["summary"]
    names = [n for n in ("dask-local", "dask-tcp", "dask-tls") if n in summary]
    return [[f"Dask overhead per submission s over a local run ({' / '.join(names)})",
             " / ".join(f"{summary[n]['overhead_s']:.2f}" for n in names), "-",
             f"local run {summary['local']['median_s']:.2f} s"]]


def markdown(rows: list[list[str]]) -> str:
    """One markdown table."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
              for row in rows]
    return "\n".join(lines)


def gantt(part: dict, path: Path) -> Path | None:
    """The slots over time, one panel per system, on one time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    systems = [s for s in ("ramp-runner", "ramp-engine", "bare pool")
               if s in part.get("systems", {})]
    if not systems:
        return None
    figure, axes = plt.subplots(len(systems), 1, figsize=(11, 1.3 + 1.2 * len(systems)),
                                sharex=True, squeeze=False)
    for axis, system in zip(axes[:, 0], systems, strict=True):
        timeline = part["systems"][system]["timeline"]
        for run in timeline:
            kind = run["name"].split("_", 1)[1]
            axis.barh(run["slot"], run["end"] - run["start"], left=run["start"], height=0.7,
                      color=KIND_COLOURS.get(kind, "grey"), edgecolor="black", linewidth=0.4)
            if run["scored"] is not None:
                axis.plot([run["scored"]] * 2, [run["slot"] - 0.35, run["slot"] + 0.35],
                          color="black", linewidth=1.5)
        makespan = part["systems"][system]["median"]["makespan"]
        axis.axvline(max(r["scored"] or r["end"] for r in timeline), color="red",
                     linestyle="--", linewidth=1)
        label = "ramp-engine 0.10.1" if system == "ramp-engine" else system
        axis.set_title(f"{label}: makespan {makespan:.1f} s (median round)", fontsize=9,
                       loc="left")
        axis.set_yticks(range(part["slots"]), [f"slot {i + 1}" for i in range(part["slots"])])
        axis.set_ylim(-0.6, part["slots"] - 0.4)
    axes[-1, 0].set_xlabel("seconds since the system was launched")
    handles = [Patch(color=c, label=k) for k, c in KIND_COLOURS.items()]
    handles.append(plt.Line2D([], [], color="black", label="scored"))
    handles.append(plt.Line2D([], [], color="red", linestyle="--", label="last scored"))
    figure.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8,
                  frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 0.93))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def report(quick: bool) -> str:
    """Run every part; write the JSON files and the chart; return the markdown table."""
    mode = "quick" if quick else "full"
    before = machine()
    results = run_parts(SETTINGS[mode])
    rows = (dispatch_rows(results["dispatch"]) + scale_rows(results["scale"])
            + remote_rows(results["remote"]) + dask_rows(results["dask"]))
    table = markdown(rows)
    chart = gantt(results["dispatch"], RESULTS / "gantt.png") if "error" not in results[
        "dispatch"] else None
    after = machine()
    caption = (f"{mode} run, {before['date']}, {before['cpus']} CPUs, "
               f"{before['memory_gib']} GiB, {before['platform']}, Python {before['python']}; "
               f"load average {before['load_average'][0]} before, "
               f"{after['load_average'][0]} after (other work on the machine makes these "
               "numbers noisy)")
    write_json("report", {"mode": mode, "settings": SETTINGS[mode], "machine_before": before,
                          "machine_after": after, "caption": caption, "table": table,
                          "chart": str(chart) if chart else None})
    (RESULTS / "report.md").write_text(f"{caption}\n\n{table}\n")
    return f"{caption}\n\n{table}\n\nchart: {chart}\nresults: {RESULTS}/*.json"


def main() -> None:
    """Print the table (see ``report``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs (~3 min)")
    print(report(parser.parse_args().quick))


if __name__ == "__main__":
    main()
