"""What the command line shows: tables, the live view of a dispatch, and log streams.

Every string that comes from a submission (its name, its error, its log) is put into a
rich ``Text`` object, never into markup: a name or message containing ``[/]`` is shown
as written instead of breaking the display.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console, Group, JustifyMethod
from rich.live import Live
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from runner import livelog
from runner.config import EventConfig
from runner.leaderboard import Entry
from runner.ledger import Submission, Transition
from runner.ramptest import ENDING_PREFIX
from runner.signals import stop_on_signals
from runner.states import FINAL_STATES, SubmissionState
from runner.training_output import STEPS, ScoreType
from runner.untrusted import VisibleLogText, visible

if TYPE_CHECKING:
    from runner.dispatcher import Dispatcher

# Piped output (CI logs, files) gets wide tables rather than rich's default of 80 columns,
# unless COLUMNS says otherwise.
PIPED_WIDTH = 160
STATE_STYLES = {SubmissionState.SCORED: "green", SubmissionState.TRAINING_ERROR: "red",
                SubmissionState.CHECKING_ERROR: "magenta", SubmissionState.TRAINING: "cyan",
                SubmissionState.TESTED: "cyan", SubmissionState.SENT_TO_TRAINING: "blue",
                SubmissionState.NEW: "dim"}
# How often the live view redraws (the elapsed times tick).
REFRESH_SECONDS = 0.25


def make_console(stderr: bool = False) -> Console:
    """A console for stdout (or stderr): the terminal's width, or a wide one when piped."""
    stream = sys.stderr if stderr else sys.stdout
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=PIPED_WIDTH if wide else None)


def seconds(value: float | None) -> str:
    """A duration for a table: enough digits that a few milliseconds do not read 0.0."""
    if value is None:
        return ""
    if value >= 10:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.1f}"
    return f"{value:.3f}"


def _megabytes(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def _state(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, ""))


def last_line(message: str) -> str:
    """The last non-blank line of a message (a traceback's exception line), before
    ramp-runner's own line on how the run ended when there is one."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[-1].startswith(ENDING_PREFIX):
        return lines[-2]
    return lines[-1] if lines else ""


def runs_per_submission(transitions: Iterable[Transition]) -> Counter[str]:
    """How many times each submission was sent to a worker (every run, lost or not)."""
    return Counter(t.name for t in transitions if t.to_state == SubmissionState.SENT_TO_TRAINING)


def _table(title: str) -> Table:
    # No vertical rules: at 80 columns the room goes to names, numbers and messages.
    return Table(title=Text(title), title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                 collapse_padding=True)


def _fixed_column(table: Table, header: str, values: Iterable[str],
                  justify: JustifyMethod = "right") -> None:
    """A column never narrower than its widest value (names, scores): headers and the
    other columns wrap first."""
    widest = max((len(value) for value in values), default=0)
    table.add_column(header, min_width=widest, justify=justify)


def status_table(title: str, submissions: Sequence[Submission],
                 runs: Counter[str], positions: Mapping[str, int] | None = None) -> Table:
    """Every submission with its state, its place in the fair queue while it waits
    (``Ledger.queue_positions``), runs, time, memory and the last line of its error; on
    events that rent instances, each one's last instance, instance-seconds and cost, and
    the event's total in the caption."""
    positions = positions or {}
    rented = any(s.instance_id for s in submissions)
    table = _table(title)
    _fixed_column(table, "submission", (s.name for s in submissions), justify="left")
    _fixed_column(table, "state", (s.state for s in submissions), justify="left")
    table.add_column("queue", justify="right")
    table.add_column("runs", justify="right")
    table.add_column("run s", justify="right")
    table.add_column("MiB", justify="right")
    if rented:
        table.add_column("instance", justify="left")
        table.add_column("inst s", justify="right")
        table.add_column("USD", justify="right")
        table.caption = f"instances: {spent_text(submissions)}"
    table.add_column("error", overflow="fold", ratio=1)
    for s in submissions:
        place = positions.get(s.name)
        cost = [Text(" ".join(filter(None, (s.instance_type, s.market)))),
                seconds(s.instance_seconds), _dollars(s.cost_usd)] if rented else []
        table.add_row(Text(visible(s.name)), _state(s.state),
                      "" if place is None else str(place), str(runs[s.name]),
                      seconds(s.run_time), _megabytes(s.peak_memory_mb), *cost,
                      Text(visible(last_line(s.error_msg))))
    return table


def _dollars(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def spent_text(submissions: Sequence[Submission]) -> str:
    """The event's instance-seconds and estimated cost, e.g. ``3600 s, 0.0416 USD``."""
    total = sum(s.instance_seconds or 0.0 for s in submissions)
    unpriced = sum(1 for s in submissions if s.instance_id and s.cost_usd is None)
    text = f"{total:.0f} s, {sum(s.cost_usd or 0.0 for s in submissions):.4f} USD"
    return text + (f" ({unpriced} without a price)" if unpriced else "")


def submission_detail(submission: Submission, transitions: Sequence[Transition]) -> Group:
    """One submission in full: its numbers, its history and its whole error message."""
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("submission", Text(visible(submission.name)))
    facts.add_row("state", _state(submission.state))
    facts.add_row("runs", str(runs_per_submission(transitions)[submission.name]))
    facts.add_row("lost runs", str(submission.attempts))
    for label, value in (("run s", submission.run_time), ("train s", submission.train_time),
                         ("valid s", submission.valid_time), ("test s", submission.test_time)):
        if value is not None:
            facts.add_row(label, seconds(value))
    if submission.peak_memory_mb is not None:
        facts.add_row("peak MiB", _megabytes(submission.peak_memory_mb))
    if submission.instance_id:
        stamp = "%Y-%m-%d %H:%M:%S"
        facts.add_row("instance", f"{submission.instance_id} {submission.instance_type} "
                                  f"{submission.market}")
        for label, at in (("launched", submission.launched_at),
                          ("terminated", submission.terminated_at)):
            if at is not None:
                facts.add_row(label, time.strftime(stamp, time.localtime(at)))
        facts.add_row("instance s", seconds(submission.instance_seconds))
        facts.add_row("USD", _dollars(submission.cost_usd) or "no price")
    for split, scores in (submission.scores or {}).items():
        facts.add_row(f"{split} scores",
                      Text("  ".join(f"{k}={v:.4g}" for k, v in scores.items())))
    history = Table("at", "from", "to", "detail", title="history", title_justify="left")
    for t in transitions:
        history.add_row(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t.at)),
                        t.from_state or "", _state(t.to_state), Text(visible(t.detail)))
    parts = [facts, history]
    if submission.error_msg:
        parts += [Text("error", style="bold"), Text(visible(submission.error_msg))]
    return Group(*parts)


def leaderboard_table(title: str, entries: Sequence[Entry],
                      score_types: Sequence[ScoreType]) -> Table:
    """The ranked submissions with every score, the step times and peak memory."""
    rows = [[str(e.rank), e.submission.name,
             *(_score(e.scores.get(t.name)) for t in score_types),
             *(seconds(getattr(e.submission, f"{step}_time")) for step in STEPS),
             _megabytes(e.submission.peak_memory_mb)] for e in entries]
    headers = ["#", "submission", *(t.name for t in score_types),
               *(f"{step} s" for step in STEPS), "MiB"]
    table = _table(title)
    for i, header in enumerate(headers):
        _fixed_column(table, header, (row[i] for row in rows),
                      justify="left" if header == "submission" else "right")
    for row in rows:
        table.add_row(*map(Text, row))
    return table


def _score(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def config_table(config: EventConfig) -> Table:
    """What an event config resolves to, key by key, secrets hidden."""
    table = Table("key", "value", title=Text(str(config.path)), show_header=False)
    for key, value in config.public_items():
        table.add_row(key, Text(repr(value)))
    table.add_row("dispatcher.slots", str(config.dispatcher.slots))
    table.add_row("ledger", Text(str(config.ledger_path)))
    return table


def summary(finals: Counter[str], elapsed: float) -> str:
    """``3 scored, 2 training_error in 22 s``: what this dispatch ended with."""
    parts = [f"{finals[state]} {state}" for state in FINAL_STATES if finals[state]]
    return f"{', '.join(parts) or 'nothing run'} in {elapsed:.0f} s"


class DispatchView:
    """Follows one dispatch: state changes as lines, and on a terminal a live table of the
    busy slots with counts per state. ``on_change`` is the dispatcher's callback."""

    def __init__(self, console: Console, live: bool, live_logs: Path | None = None):
        self.console = console
        self.live = live
        # The event's live logs (runner.livelog): each slot's line ends with its last line.
        self.live_logs = live_logs
        self.started = time.monotonic()
        self.states: dict[str, str] = {}
        self.finals: Counter[str] = Counter()
        self._lock = threading.Lock()

    def on_change(self, name: str, state: str) -> None:
        """Record and show one state change (called from the dispatcher's slot threads)."""
        with self._lock:
            self.states[name] = state
            if state in FINAL_STATES:
                self.finals[state] += 1
        stamp = time.strftime("%H:%M:%S")
        if self.live:
            self.console.print(Text.assemble((stamp, "dim"), "  ", name, "  ", _state(state)))
        else:
            # Plain lines for logs and pipes: no markup, no colour codes.
            print(f"{stamp}  {name}  {state}", flush=True)

    def render(self, running: Sequence[tuple[str, str, float, float]]) -> Group:
        """The live part: one line per busy slot, then the counts per state."""
        slots = Table.grid(padding=(0, 2))
        for _ in range(3):
            slots.add_column(no_wrap=True)
        slots.add_column(no_wrap=True, overflow="ellipsis")
        for name, status, elapsed, timeout in running:
            limit = f" / {timeout:.0f} s" if timeout else ""
            said = "" if self.live_logs is None else livelog.last_line(
                self.live_logs, name, self.console.width)
            slots.add_row(Text(visible(name)), Text(self.states.get(name, status)),
                          Text(f"{elapsed:.0f} s{limit}", style="dim"), Text(said, style="dim"))
        with self._lock:
            counts = Counter(self.states.values())
        tally = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        elapsed = time.monotonic() - self.started
        line = Text(f"{len(running)} running · {tally or 'starting'} · {elapsed:.0f} s",
                    style="bold")
        return Group(slots, line)

    def summary(self) -> str:
        """The closing line of the dispatch."""
        return summary(self.finals, time.monotonic() - self.started)

    def run(self, dispatcher: Dispatcher) -> bool:
        """Run ``dispatcher`` to its end while showing it; return whether SIGINT or SIGTERM
        stopped it. Exceptions of ``dispatcher.run`` are raised here."""
        failures: list[BaseException] = []

        def target() -> None:
            try:
                dispatcher.run()
            except BaseException as error:  # handed to the main thread
                failures.append(error)

        # The dispatcher runs in a thread so that this one draws; signals reach this
        # thread only, which asks the dispatcher to stop (it then gives its claims back).
        thread = threading.Thread(target=target, name="dispatcher", daemon=True)
        with stop_on_signals(dispatcher.stop) as interrupted:
            thread.start()
            self._follow(dispatcher, thread)
        if failures:
            raise failures[0]
        return interrupted.is_set()

    def _follow(self, dispatcher: Dispatcher, thread: threading.Thread) -> None:
        if not self.live:
            while thread.is_alive():
                thread.join(REFRESH_SECONDS)
            return
        with Live(self.render(dispatcher.running()), console=self.console, transient=True,
                  refresh_per_second=1 / REFRESH_SECONDS) as live:
            while thread.is_alive():
                thread.join(REFRESH_SECONDS)
                live.update(self.render(dispatcher.running()))


class _Once(logging.Filter):
    """Lets each distinct message through once (``no conda found`` per run, shown once)."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.levelno, record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


def configure_logging(console: Console, verbose: bool, log_file: Path | None = None) -> None:
    """The terminal gets warnings, each once (every step with ``verbose``); ``log_file``
    gets every step."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if console.is_terminal:
        stream: logging.Handler = RichHandler(console=console, show_path=False, markup=False)
        stream.setFormatter(logging.Formatter("%(message)s"))
    else:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    stream.setLevel(logging.DEBUG if verbose else logging.WARNING)
    stream.addFilter(VisibleLogText())
    if not verbose:
        stream.addFilter(_Once())
    root.addHandler(stream)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        to_file.setLevel(logging.INFO)
        to_file.addFilter(VisibleLogText())
        root.addHandler(to_file)
