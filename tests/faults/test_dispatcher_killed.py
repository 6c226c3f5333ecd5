"""A dispatcher SIGKILLed at any point of a submission's life, then restarted: every
submission ends in exactly one final state, none is scored twice, no run and no scratch
folder is left behind, and a sandboxed run loses no attempt; an unsandboxed submission
that kills its dispatcher is given up after ``max_attempts``."""

from __future__ import annotations

import os
import random
import shutil
import signal
import time

import pytest

from runner.config import load_event_config
from runner.dispatcher import Dispatcher
from runner.ledger import Ledger
from tests.events import make_event
from tests.faults.helpers import (
    dispatch,
    dispatch_killed_at,
    processes_under,
    scored_transitions,
    start_dispatch,
    states,
    wait_for_state,
    wait_until_gone,
)

# (fault, FolderSource method the dispatcher dies at, before or after the real call,
#  the state the submission is left in)
KILL_POINTS = [
    ("at claim", "claim", "after", "sent_to_training"),
    ("in flight", "mark_training", "after", "training"),
    # tested and scored are one transaction of the ledger: killed before it, nothing of
    # the run is recorded.
    ("at collect", "record_run", "before", "training"),
]


@pytest.mark.parametrize(("method", "when", "left"), [k[1:] for k in KILL_POINTS],
                         ids=[k[0] for k in KILL_POINTS])
def test_sigkill_then_restart_scores_once_and_leaves_nothing(tmp_path, method, when, left):
    path = make_event(tmp_path, ("starting_kit",))
    config = load_event_config(path)
    assert dispatch_killed_at(path, method, when) == -signal.SIGKILL
    assert states(config.ledger_path)["starting_kit"][0] == left
    assert wait_until_gone(tmp_path) == []  # the run died with its dispatcher

    Dispatcher(config).run()

    # Sandboxed (or not started yet): the dispatcher's death was not the run's doing.
    assert states(config.ledger_path) == {"starting_kit": ("scored", 0, "")}
    assert scored_transitions(config.ledger_path) == {"starting_kit": 1}
    scratch = config.ledger_path.with_name(config.ledger_path.name + ".scratch")
    assert list(scratch.iterdir()) == []


def test_sigkill_during_recovery_then_restart(tmp_path):
    path = make_event(tmp_path, ("starting_kit", "random_forest"))
    config = load_event_config(path)
    assert dispatch_killed_at(path, "mark_training", "after") == -signal.SIGKILL
    assert dispatch_killed_at(path, "recover_abandoned", "after") == -signal.SIGKILL

    Dispatcher(config).run()

    assert {n: s[0] for n, s in states(config.ledger_path).items()} == {
        "starting_kit": "scored", "random_forest": "scored"}
    assert scored_transitions(config.ledger_path) == {"starting_kit": 1, "random_forest": 1}


def test_five_sigkills_at_random_moments_cost_no_sandboxed_run_an_attempt(tmp_path):
    """A deploy, the OOM killer or a reboot, five times in an evening: the submissions in
    flight at each kill (the oldest, claimed first after every restart) are run again at no
    cost, and every one is scored exactly once."""
    path = make_event(tmp_path, ("starting_kit",), dispatcher={"n_workers": 2})
    names = ["starting_kit"] + [f"team_{i}" for i in range(1, 6)]
    for name in names[1:]:
        shutil.copytree(tmp_path / "submissions" / "starting_kit", tmp_path / "submissions" / name)
    config = load_event_config(path)
    moments = random.Random(24)
    for _ in range(5):
        process = start_dispatch(path)
        wait_for_state(config.ledger_path, "training")
        time.sleep(moments.uniform(0.0, 1.5))
        os.kill(process.pid, signal.SIGKILL)  # the dispatcher alone, as the OOM killer does
        process.wait()
        assert wait_until_gone(tmp_path, 15) == []

    assert dispatch(path).returncode == 0
    assert states(config.ledger_path) == {name: ("scored", 0, "") for name in names}
    assert scored_transitions(config.ledger_path) == dict.fromkeys(names, 1)


def test_scratch_of_a_killed_run_is_reaped_at_the_next_start(tmp_path):
    path = make_event(tmp_path, ("hanging",), worker={"timeout": 600})
    config = load_event_config(path)
    scratch = config.ledger_path.with_name(config.ledger_path.name + ".scratch")
    process = start_dispatch(path)
    wait_for_state(config.ledger_path, "training")
    deadline = time.monotonic() + 30
    while len(processes_under(tmp_path)) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)  # dispatcher, supervisor, bwrap and ramp-test: the run is going
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert wait_until_gone(tmp_path, 15) == []
    assert [p.name.startswith("ramp-hanging-") for p in scratch.iterdir()] == [True]

    # The organiser stops it meanwhile; the next dispatcher has nothing to run, and reaps.
    with Ledger(config.ledger_path) as ledger:
        ledger.mark_checking_error("hanging", "stopped by the organiser")
    Dispatcher(config).run()
    assert list(scratch.iterdir()) == []


# A submission that SIGKILLs the dispatcher running it (its supervisor's parent); ramp-test
# refuses source naming os-level functions, hence the indirection.
KILLER = '''
import importlib


class Classifier:
    def fit(self, X, y):
        system = importlib.import_module("o" + "s")
        signals = importlib.import_module("sig" + "nal")

        def parent(pid):
            reader = getattr(importlib.import_module("builtins"), "op" + "en")
            with reader(f"/proc/{pid}/stat") as handle:
                return int(handle.read().rsplit(")", 1)[1].split()[1])

        supervisor = getattr(system, "getp" + "pid")()
        getattr(system, "ki" + "ll")(parent(supervisor), signals.SIGKILL)

    def predict_proba(self, X):
        raise RuntimeError("never reached")
'''


def test_a_submission_killing_its_dispatcher_is_given_up_after_max_attempts(tmp_path):
    path = make_event(tmp_path, ("starting_kit",), worker={"sandbox": "off"},
                      dispatcher={"max_attempts": 2, "n_workers": 1})
    killer = tmp_path / "submissions" / "killer"
    killer.mkdir()
    (killer / "classifier.py").write_text(KILLER)
    config = load_event_config(path)

    exits = []
    for _ in range(4):  # the organiser's supervisor restarting the dispatcher
        exits.append(dispatch(path).returncode)
        if exits[-1] == 0:
            break

    assert exits.count(-signal.SIGKILL) == 2 and exits[-1] == 0, exits
    final = states(config.ledger_path)
    assert final["killer"] == (
        "checking_error", 2, "the dispatcher died 2 times while running this submission")
    assert final["starting_kit"][0] == "scored"
    assert processes_under(tmp_path) == []
