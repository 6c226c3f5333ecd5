"""``ramp-runner logs``: a running local submission's log, live, through the real dispatcher
and the real command, escaped and bounded; the live view's slot line."""

from __future__ import annotations

import subprocess
import threading

import pytest

from runner.ledger import Ledger
from runner.livelog import LINE_CHARS, REFRESH_BYTES, LiveCopy, LogText, skipped_marker, window
from tests.chatty import (
    FIRST_LINE,
    HUGE_LINE_CHARS,
    LAST_LINE,
    NAME,
    PROGRAM,
    add_chatty,
    follow,
    wait_until_training,
)
from tests.events import make_event
from tests.test_cli import ANSI, under_terminal


@pytest.fixture(scope="module")
def event(tmp_path_factory):
    """The chatty submission and the starting kit dispatched on a 120-column terminal, with
    ``logs --follow`` on the chatty one from the moment it trains, and a plain ``logs``
    once its first line is out."""
    root = tmp_path_factory.mktemp("event")
    path = make_event(root, ("starting_kit",), worker={"timeout": 120})
    add_chatty(path)
    ledger = path.with_name("ramp-runner.sqlite3")
    screen = []
    dispatch = threading.Thread(target=lambda: screen.append(
        under_terminal([PROGRAM, "dispatch", "-e", str(path)], columns=120)))
    dispatch.start()
    wait_until_training(ledger, dispatch.is_alive)

    def snapshot():
        return subprocess.run([PROGRAM, "logs", "-e", str(path), "-s", NAME],
                              capture_output=True, timeout=60)

    followed = follow(path, ledger, at_first_line=snapshot)
    dispatch.join(180)
    assert not dispatch.is_alive()
    return path, ledger, followed, screen[0]


def test_follow_shows_lines_while_the_run_runs_and_ends_with_its_state(event):
    _, _, followed, _ = event
    assert followed.returncode == 0, followed.stderr
    assert followed.state_at_first_line == "training"
    assert any(LAST_LINE in line for line in followed.lines)
    assert followed.lines[-1] == f"{NAME}: scored"


def test_logs_without_follow_prints_what_is_there_and_returns(event):
    _, _, followed, _ = event
    snapshot = followed.meanwhile
    assert snapshot.returncode == 0, snapshot.stderr
    assert FIRST_LINE.encode() in snapshot.stdout
    assert not snapshot.stdout.decode().rstrip().endswith(f"{NAME}: scored")


def test_hostile_output_is_escaped_and_cut(event):
    _, _, followed, _ = event
    # No control character reaches the terminal: the escapes are shown as text.
    assert b"\x1b" not in followed.raw and b"\x07" not in followed.raw
    assert "\u202e" not in followed.raw.decode()
    line = next(x for x in followed.lines if x.startswith("CHATTY line 2"))
    assert line == r"CHATTY line 2 \x1b]0;owned\x07 \x1b[2J \u202eevil"
    huge = next(x for x in followed.lines if x.startswith("HUGE "))
    cut = len("HUGE ") + HUGE_LINE_CHARS - LINE_CHARS
    assert huge == "HUGE " + "X" * (LINE_CHARS - len("HUGE ")) + f" [... {cut} more characters]"
    assert "NOT UTF-8 \ufffd\ufffd end" in followed.lines


def test_no_test_score_with_hidden_test_labels(event):
    # The run is the ingestion program (hidden test labels on): it never scores the test
    # fold, so no line of the live log is a test score (ramp-test prints "test  0.844 ...").
    _, _, followed, _ = event
    assert any(line.startswith("CV fold") for line in followed.lines)
    assert not [line for line in followed.lines if line.strip().startswith("test")]


def test_the_live_view_shows_each_slots_last_line(event):
    _, _, _, (code, screen) = event
    assert code == 0, screen
    plain = ANSI.sub("", screen)
    # The slot's line ends with the last line the run printed, escaped.
    assert r"CHATTY line 2 \x1b]0;owned\x07" in plain
    assert "\x1b]0;owned" not in screen


def test_the_live_log_is_gone_once_the_run_is_torn_down(event):
    path, ledger, _, _ = event
    assert not (ledger.parent / f"{ledger.name}.live" / f"{NAME}.log").exists()
    assert LAST_LINE in (path.parent / "runs" / "logs" / NAME / "log").read_text()


@pytest.mark.parametrize("name, message", [
    ("no_such_submission", "no_such_submission"),
    ("starting_kit", "starting_kit is not running (it is scored)"),
])
def test_unknown_or_finished_submission_is_one_line_and_exit_2(event, name, message):
    path, _, _, _ = event
    result = subprocess.run([PROGRAM, "logs", "-e", str(path), "-s", name],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr


def test_a_running_submission_without_its_dispatcher_is_one_line_and_exit_2(tmp_path):
    # A dispatcher killed mid-run leaves the submission training in the ledger.
    path = make_event(tmp_path / "event", ())
    with Ledger(path.with_name("ramp-runner.sqlite3")) as ledger:
        ledger.add([NAME])
        ledger.claim(1, worker="dead-dispatcher")
        ledger.mark_training(NAME)
    result = subprocess.run([PROGRAM, "logs", "-e", str(path), "-s", NAME, "--follow"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == (f"error: {NAME} is training but no dispatcher runs this event "
                             "(the next dispatch puts it back in the queue)\n")


# -- the live copy's bounds, on real files --------------------------------------------------


def test_a_refresh_brings_the_newest_bytes_after_a_marker_and_the_copy_stays_bounded(tmp_path):
    copy = LiveCopy(tmp_path, "sub", limit_bytes=300_000)
    copy.start()
    log = b"".join(b"line %06d\n" % i for i in range(30_000))  # 330,000 bytes
    start = window(len(log), copy.offset)
    copy.add(log[start:start + REFRESH_BYTES], start)
    kept = (tmp_path / "sub.log").read_bytes()
    assert kept == skipped_marker(len(log) - REFRESH_BYTES) + log[-REFRESH_BYTES:]
    copy.add(b"y" * 1_000_000, len(log))  # past log_limit_mb: cut at the limit
    assert (tmp_path / "sub.log").stat().st_size == 300_000


def test_shown_text_ends_lines_at_carriage_returns_and_keeps_split_characters():
    text = LogText(line_chars=20)
    assert text.feed("épo".encode()[:1]) == []  # half of "é"
    assert text.feed("épo".encode()[1:] + b"ch 1\repoch 2\r\n\x1b[31mred") == ["époch 1", "epoch 2"]
    assert text.flush() == [r"\x1b[31mred"]
