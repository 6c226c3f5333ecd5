"""Every failed run's message ends with how its process ended, stated by ramp-runner (the
exit code, the signal's name, the timeout or the limit that stopped it), whatever the run
printed or closed: a run that closes its stdout and stderr leaves no traceback behind."""

from __future__ import annotations

import pytest

from runner.config import load_event_config
from tests.events import make_event
from tests.faults.helpers import dispatch, states

# Close what ramp-test's traceback would go to, then fail ({end}): the log ends at
# "CV fold 0".
SILENT = '''
import importlib


class Classifier:
    def fit(self, X, y):
        system = importlib.import_module("o" + "s")
        getattr(system, "clo" + "se")(1)
        getattr(system, "clo" + "se")(2)
        {end}

    def predict_proba(self, X):
        raise RuntimeError("never reached")
'''
SILENT_EXIT = SILENT.format(end='raise RuntimeError("nobody reads this")')
SILENT_SIGNAL = SILENT.format(
    end='getattr(system, "ki" + "ll")(getattr(system, "getp" + "id")(), 11)')
# Prints a fake traceback header at import (every fold imports it again), then exits 1
# in fit of the third and last fold, after ramp-test printed the first two folds' test
# scores: taking the log's first "Traceback" made those scores the participant's message
# (RAMP's issue 179).
FAKE_TRACEBACK = '''
import importlib

print("Traceback (most recent call last):", flush=True)


class Classifier:
    def fit(self, X, y):
        environ = getattr(importlib.import_module("o" + "s"), "environ")
        environ["FOLDS_SEEN"] = str(int(environ.get("FOLDS_SEEN", "0")) + 1)
        if environ["FOLDS_SEEN"] == "3":
            getattr(importlib.import_module("sys"), "ex" + "it")(1)
        self.classes = sorted(set(y))
        return self

    def predict_proba(self, X):
        np = importlib.import_module("numpy")
        return np.full((len(X), len(self.classes)), 1 / len(self.classes))
'''
SUBMISSIONS = {"silent_exit": SILENT_EXIT, "silent_signal": SILENT_SIGNAL,
               "fake_traceback": FAKE_TRACEBACK}


@pytest.fixture(scope="module")
def ended(tmp_path_factory):
    """The final ``(state, error_msg)`` of each submission of one dispatched event."""
    root = tmp_path_factory.mktemp("endings")
    path = make_event(root, ("raising_error", "hanging"), worker={"timeout": 4})
    for name, source in SUBMISSIONS.items():
        (root / "submissions" / name).mkdir()
        (root / "submissions" / name / "classifier.py").write_text(source)
    assert dispatch(path).returncode == 0
    return {name: (state, message)
            for name, (state, _, message) in states(load_event_config(path).ledger_path).items()}


@pytest.mark.parametrize(("submission", "ending"), [
    ("silent_exit", "ramp-runner: the run exited with code 1"),
    ("silent_signal", "ramp-runner: the run was killed by signal SIGSEGV (exit code 139)"),
    ("raising_error", "ramp-runner: the run exited with code 1"),
    ("fake_traceback", "ramp-runner: the run exited with code 1"),
    ("hanging", "ramp-runner: the run was stopped at its timeout (timeout=4 s)"),
])
def test_the_message_ends_with_how_the_run_ended(ended, submission, ending):
    state, message = ended[submission]
    assert state == "training_error"
    assert message.splitlines()[-1] == ending, message


def test_the_traceback_is_still_the_message_when_there_is_one(ended):
    assert "RuntimeError: raising_error: this submission fails on purpose" in \
        ended["raising_error"][1]


def test_a_printed_traceback_never_brings_the_test_scores_into_the_message(ended):
    """The message comes from the run's error (a fold's error.txt, or the traceback that
    ends the log), never from a "Traceback" the submission printed before ramp-test's
    score tables."""
    message = ended["fake_traceback"][1]
    for score in ("acc", "nll", "test", "valid", "train", "CV fold"):
        assert score not in message, message
    assert message == "ramp-runner: the run exited with code 1"
