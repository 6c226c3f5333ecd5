"""Text a submission shaped is shown, logged and stored with its control characters as
escapes: an exception message full of terminal escape sequences, run through the real
dispatcher and the real command line, reaches neither the organiser's terminal nor the
ledger raw; folder names are matched whole and bounded, and refused in one line."""

from __future__ import annotations

import pytest

from runner.config import load_event_config
from runner.submissions import MAX_NAME_LENGTH, valid_name
from runner.untrusted import visible
from tests.events import make_event
from tests.faults.helpers import dispatch, states
from tests.test_cli import PROGRAM, ramp_runner, under_terminal

# Retitle the terminal, clear it, write its clipboard (OSC 52), ask it to type a reply,
# and reverse what follows on screen.
ESCAPES = "\x1b]0;owned\x07\x1b[2J\x1b]52;c;ZWNobyBvd25lZA==\x07\x1b[6n\u202eevil"
HOSTILE = f'''
class Classifier:
    def fit(self, X, y):
        raise RuntimeError({ESCAPES!r})

    def predict_proba(self, X):
        raise RuntimeError("never reached")
'''


@pytest.fixture(scope="module")
def event(tmp_path_factory):
    """The example event with the escaping submission, a folder whose name ends in a
    newline and one with a 240-character name, dispatched once."""
    root = tmp_path_factory.mktemp("untrusted")
    path = make_event(root, ("starting_kit",))
    hostile = root / "submissions" / "escapes"
    hostile.mkdir()
    (hostile / "classifier.py").write_text(HOSTILE)
    for name in ("newline\n", "n" * 240):
        (root / "submissions" / name).mkdir()
        (root / "submissions" / name / "classifier.py").write_text(HOSTILE)
    completed = dispatch(path)
    return path, completed


def test_dispatch_refuses_bad_names_in_one_line_each_and_goes_on(event):
    path, completed = event
    assert completed.returncode == 0, completed.stderr
    refused = [line for line in completed.stderr.splitlines() if "not a valid" in line]
    assert len(refused) == 2 and all("\n" not in line for line in refused)
    final = states(load_event_config(path).ledger_path)
    assert set(final) == {"starting_kit", "escapes"}


def test_the_ledger_stores_escapes_not_control_characters(event):
    path, _ = event
    message = states(load_event_config(path).ledger_path)["escapes"][2]
    assert "\x1b" not in message and "\u202e" not in message
    assert "\\x1b]0;owned\\x07\\x1b[2J" in message and "\\u202eevil" in message


@pytest.mark.parametrize("arguments", [[], ["--submission", "escapes"]],
                         ids=["status", "status --submission"])
def test_status_shows_escapes_on_a_terminal_and_piped(event, arguments):
    path, _ = event
    piped = ramp_runner("status", "-e", str(path), *arguments)
    code, screen = under_terminal([PROGRAM, "status", "-e", str(path), *arguments])
    assert piped.returncode == code == 0
    for output in (piped.stdout, screen):
        assert "\x1b]" not in output and "\x1b[6n" not in output and "\u202e" not in output
        assert "\\x1b" in output


def test_names_are_matched_whole_and_bounded():
    assert valid_name("a" * MAX_NAME_LENGTH) and not valid_name("a" * (MAX_NAME_LENGTH + 1))
    assert not valid_name("newline\n") and not valid_name("") and not valid_name(".hidden")


def test_visible_keeps_newlines_and_tabs_and_shows_the_rest():
    assert visible("a\tb\nc\x1b[2J\x9b\u2066") == "a\tb\nc\\x1b[2J\\x9b\\u2066"
