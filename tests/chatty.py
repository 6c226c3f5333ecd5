"""A submission that prints while it runs (hostile output included), for the tests of the
live log (``ramp-runner logs``), and how to follow it through the real command."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from runner.ledger import Ledger

PROGRAM = str(Path(sys.executable).with_name("ramp-runner"))
NAME = "chatty"
FIRST_LINE = "CHATTY line 0"
LAST_LINE = "CHATTY after the sleep"
# One line longer than anything a terminal should get, and bytes that are not UTF-8.
HUGE_LINE_CHARS = 100_000
# Sleep per fold, after printing: the run is seen while it runs.
SLEEP_SECONDS = 2

CLASSIFIER = f'''
import importlib
import sys

from sklearn.linear_model import LogisticRegression

SLEEP = getattr(importlib.import_module("time"), "sl" + "eep")


class Classifier:
    def fit(self, X, y):
        print("HUGE " + "X" * {HUGE_LINE_CHARS}, flush=True)
        sys.stdout.buffer.write(b"NOT UTF-8 \\xff\\xfe end\\n")
        sys.stdout.flush()
        for i in range(3):
            # The last line before the sleep carries a terminal's title, a screen clear
            # and a right-to-left override.
            tail = " \\x1b]0;owned\\x07 \\x1b[2J \\u202eevil" if i == 2 else ""
            print(f"CHATTY line {{i}}{{tail}}", flush=True)
        SLEEP({SLEEP_SECONDS})
        print("{LAST_LINE}", flush=True)
        self.model = LogisticRegression(max_iter=500).fit(X, y)
        return self

    def predict_proba(self, X):
        return self.model.predict_proba(X)
'''


def add_chatty(event_config: Path) -> None:
    """Put the chatty submission in the event's submissions folder."""
    folder = event_config.parent / "submissions" / NAME
    folder.mkdir(parents=True)
    (folder / "classifier.py").write_text(CLASSIFIER)


def ramp_runner(*arguments: str, **popen) -> subprocess.Popen:
    """The console script, piped, as an organiser runs it."""
    env = {**os.environ, "COLUMNS": "80"}
    env.pop("RAMP_EVENT_CONFIG", None)
    return subprocess.Popen([PROGRAM, *arguments], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, **popen)


def wait_for_line(process: subprocess.Popen, text: str, timeout: float = 120) -> list[str]:
    """Read ``process``'s stdout up to the line holding ``text``; the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    for raw in process.stdout:
        lines.append(raw.decode(errors="replace").rstrip("\n"))
        if text in lines[-1] or time.monotonic() > deadline:
            break
    assert text in lines[-1], f"never saw {text!r} in {lines}"
    return lines


def wait_until_training(ledger: Path, alive=lambda: True, timeout: float = 120) -> None:
    """Wait until the chatty submission trains (fail if ``alive()`` turns False first)."""
    deadline = time.monotonic() + timeout
    while not _training(ledger):
        assert time.monotonic() < deadline, "the chatty submission never started training"
        assert alive(), "the dispatcher ended before the chatty submission trained"
        time.sleep(0.1)


def _training(ledger: Path) -> bool:
    if not ledger.exists():
        return False
    with Ledger(ledger) as opened:
        return NAME in opened.names() and opened.get(NAME).state == "training"


@dataclass
class Followed:
    """What ``ramp-runner logs --follow`` did."""

    returncode: int
    lines: list[str]
    raw: bytes
    stderr: str
    # The submission's state in the ledger when the first line it printed was shown.
    state_at_first_line: str | None
    # What ``at_first_line`` returned.
    meanwhile: object = None


def follow(event_config: Path, ledger: Path, at_first_line=lambda: None,
           timeout: float = 180) -> Followed:
    """Run ``logs --follow`` on the chatty submission (running) to its end; call
    ``at_first_line`` once the first line the submission printed is shown."""
    process = ramp_runner("logs", "-e", str(event_config), "-s", NAME, "--follow")
    raw, lines, state, meanwhile = [], [], None, None
    deadline = time.monotonic() + timeout
    try:
        for line in process.stdout:
            raw.append(line)
            lines.append(line.decode(errors="replace").rstrip("\n"))
            if state is None and FIRST_LINE in lines[-1]:
                with Ledger(ledger) as opened:
                    state = opened.get(NAME).state
                meanwhile = at_first_line()
            assert time.monotonic() < deadline, f"logs --follow still going: {lines[-5:]}"
        process.wait(30)
    finally:
        process.kill()
    return Followed(process.returncode, lines, b"".join(raw),
                    process.stderr.read().decode(errors="replace"), state, meanwhile)


def dispatch_and_follow(event_config: Path) -> Followed:
    """Run ``ramp-runner dispatch`` on the event in a process of its own and follow the
    chatty submission from the moment it trains to its end; the dispatch must exit 0."""
    ledger = event_config.with_name("ramp-runner.sqlite3")
    dispatch = ramp_runner("dispatch", "-e", str(event_config))
    try:
        wait_until_training(ledger, lambda: dispatch.poll() is None)
        followed = follow(event_config, ledger)
        _, err = dispatch.communicate(timeout=120)
    finally:
        dispatch.kill()
    assert dispatch.returncode == 0, err
    return followed


def assert_followed_to_scored(followed: Followed, event_config: Path) -> None:
    """Every line was shown, escaped, while the run trained; it ended scored, and its
    live copy went with the run."""
    assert followed.returncode == 0, followed.stderr
    assert followed.state_at_first_line == "training"
    assert any(FIRST_LINE in line for line in followed.lines)
    assert any(LAST_LINE in line for line in followed.lines)
    assert r"CHATTY line 2 \x1b]0;owned\x07 \x1b[2J \u202eevil" in followed.lines
    assert b"\x1b" not in followed.raw
    assert followed.lines[-1] == f"{NAME}: scored"
    ledger = event_config.with_name("ramp-runner.sqlite3")
    assert not (ledger.parent / f"{ledger.name}.live" / f"{NAME}.log").exists()
