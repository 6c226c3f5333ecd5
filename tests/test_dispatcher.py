"""The dispatcher on the example event: real ramp-test runs, real processes, real signals."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runner.config import load_event_config
from runner.dispatcher import Dispatcher, DispatcherBusy
from runner.ledger import Ledger
from runner.worker import BaseWorker
from tests.events import EXAMPLE, make_event, register_worker
from tests.faults.helpers import processes_under, wait_for_state

REPO = Path(__file__).resolve().parent.parent
# The example's own submissions, named: what an organiser adds to examples/iris with
# `ramp-runner submit` must not change what this test expects.
ALL_EXAMPLES = ("gradient_boosting", "hanging", "raising_error", "random_forest", "starting_kit")


def test_example_event_end_to_end(tmp_path):
    assert all((EXAMPLE / "submissions" / name).is_dir() for name in ALL_EXAMPLES)
    config = load_event_config(make_event(tmp_path, ALL_EXAMPLES, worker={"timeout": 20}))
    seen = []
    Dispatcher(config, on_change=lambda name, state: seen.append((name, state))).run()

    with Ledger(config.ledger_path) as ledger:
        states = {s.name: s for s in ledger.all()}
    assert {n: s.state for n, s in states.items()} == {
        "gradient_boosting": "scored",
        "hanging": "training_error",
        "raising_error": "training_error",
        "random_forest": "scored",
        "starting_kit": "scored",
    }
    assert states["raising_error"].error_msg.startswith("Traceback")
    assert "fails on purpose" in states["raising_error"].error_msg
    assert "timeout=20" in states["hanging"].error_msg
    for name in ("starting_kit", "random_forest", "gradient_boosting"):
        submission = states[name]
        assert 0 < submission.scores["test"]["acc"] <= 1
        assert submission.train_time > 0 and submission.peak_memory_mb > 0
        assert (Path(config.worker.logs_dir) / name / "log").is_file()
    assert states["random_forest"].scores["test"]["acc"] > states["starting_kit"].scores[
        "test"]["acc"]
    assert ("starting_kit", "scored") in seen
    assert processes_under(tmp_path) == []


def test_seed_style_custom_worker_runs_through_an_entry_point(tmp_path, monkeypatch):
    site = tmp_path / "site"
    register_worker(site, "seed", "seed_worker_plugin:SeedStyleWorker",
                    (Path(__file__).parent / "seed_worker.py").read_text())
    monkeypatch.syspath_prepend(str(site))
    config = load_event_config(make_event(
        tmp_path / "event", ("starting_kit", "raising_error"), worker={"worker_type": "seed"}))

    Dispatcher(config).run()

    with Ledger(config.ledger_path) as ledger:
        assert ledger.get("starting_kit").state == "scored"
        assert ledger.get("raising_error").state == "training_error"
        assert "fails on purpose" in ledger.get("raising_error").error_msg


def _dispatcher_process(config_path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "invoke", "--search-root", str(REPO), "dispatch",
         "--event-config", str(config_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_sigterm_stops_runs_and_gives_submissions_back(tmp_path):
    path = make_event(tmp_path, ("hanging", "starting_kit"), worker={"timeout": 600},
                      dispatcher={"n_workers": 1})
    config = load_event_config(path)
    process = _dispatcher_process(path)
    wait_for_state(config.ledger_path, "training")
    time.sleep(1)  # let the hanging run get going (and fork its child)
    assert processes_under(tmp_path)
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=60) == 130  # interrupted (runner.cli's exit codes)

    with Ledger(config.ledger_path) as ledger:
        states = {s.name: (s.state, s.attempts) for s in ledger.all()}
    assert states == {"hanging": ("new", 0), "starting_kit": ("new", 0)}
    assert processes_under(tmp_path) == []


def test_second_dispatcher_on_the_same_event_is_refused(tmp_path):
    config = load_event_config(make_event(tmp_path, ("hanging",), worker={"timeout": 600}))
    first = Dispatcher(config)
    thread = threading.Thread(target=first.run)
    thread.start()
    try:
        wait_for_state(config.ledger_path, "training")
        with pytest.raises(DispatcherBusy, match="another dispatcher"):
            Dispatcher(config).run()
    finally:
        first.stop()
        thread.join(60)
    assert not thread.is_alive()


def test_a_run_stopped_from_outside_is_killed_and_not_written_over(tmp_path):
    config = load_event_config(make_event(
        tmp_path, ("hanging",), worker={"timeout": 600},
        dispatcher={"time_between_collection": 0.5, "hunger_policy": "exit"}))
    dispatcher = Dispatcher(config)
    thread = threading.Thread(target=dispatcher.run)
    thread.start()
    try:
        wait_for_state(config.ledger_path, "training")
        time.sleep(1)  # the hanging run and its forked child are going
        assert processes_under(tmp_path)
        with Ledger(config.ledger_path) as organiser:
            organiser.mark_checking_error("hanging", "stopped by the organiser")
        # Stopped within a poll interval or two, then nothing is left to run: it exits.
        thread.join(10)
        assert not thread.is_alive()
    finally:
        dispatcher.stop()
        thread.join(60)
    with Ledger(config.ledger_path) as ledger:
        hanging = ledger.get("hanging")
    assert (hanging.state, hanging.error_msg) == ("checking_error", "stopped by the organiser")
    assert processes_under(tmp_path) == []


class ScriptedWorker(BaseWorker):
    """A worker whose outcome per submission and attempt is set by the test."""

    script: dict[str, list[str]] = {}
    setup_delay: dict[str, float] = {}
    collect_delay: dict[str, float] = {}
    teardown_delay: dict[str, float] = {}
    calls: list[tuple[str, str]] = []  # ("setup" or "teardown", submission), in order
    output: Path | None = None

    def setup(self):
        self.calls.append(("setup", self.submission))
        time.sleep(self.setup_delay.get(self.submission, 0))
        if self.script[self.submission][0] == "setup_fails":
            self.script[self.submission].pop(0)
            raise ConnectionError("the instance never answered")
        super().setup()

    def launch_submission(self):
        self._outcome = self.script[self.submission].pop(0)
        super().launch_submission()

    def _is_submission_interrupted(self):
        return self._outcome == "interrupted"

    def _is_submission_finished(self):
        return True

    def collect_results(self):
        super().collect_results()
        time.sleep(self.collect_delay.get(self.submission, 0))
        shutil.copytree(self.output, Path(self.config["predictions_dir"]) / self.submission)
        self.status = "collected"
        return 0, ""

    def teardown(self):
        time.sleep(self.teardown_delay.pop(self.submission, 0))
        super().teardown()
        self.calls.append(("teardown", self.submission))


@pytest.fixture(scope="module")
def real_output(tmp_path_factory):
    """The training_output of one real ramp-test run, which ScriptedWorker hands back."""
    config = load_event_config(make_event(tmp_path_factory.mktemp("real"), ("starting_kit",)))
    Dispatcher(config).run()
    return Path(config.worker.predictions_dir) / "starting_kit"


@pytest.fixture
def scripted_event(tmp_path, monkeypatch, real_output):
    """Make an event with empty submission folders, run by ScriptedWorker."""
    monkeypatch.setattr("runner.dispatcher.worker_class", lambda worker_type: ScriptedWorker)
    monkeypatch.setattr(ScriptedWorker, "output", real_output)
    monkeypatch.setattr(ScriptedWorker, "script", {})
    monkeypatch.setattr(ScriptedWorker, "setup_delay", {})
    monkeypatch.setattr(ScriptedWorker, "collect_delay", {})
    monkeypatch.setattr(ScriptedWorker, "teardown_delay", {})
    monkeypatch.setattr(ScriptedWorker, "calls", [])

    def make(names, max_attempts=3, n_workers=2):
        config = load_event_config(make_event(
            tmp_path, (), dispatcher={"max_attempts": max_attempts, "n_workers": n_workers}))
        for name in names:
            (Path(config.worker.submissions_dir) / name).mkdir(parents=True)
        return config

    return make


def test_interrupted_run_is_retried_then_scored(scripted_event):
    config = scripted_event(["spot"])
    ScriptedWorker.script.update(spot=["interrupted", "ok"])
    Dispatcher(config).run()
    with Ledger(config.ledger_path) as ledger:
        submission = ledger.get("spot")
        assert (submission.state, submission.attempts) == ("scored", 1)
        back = [t for t in ledger.transitions("spot") if t.to_state == "new"]
        assert "interrupted" in back[-1].detail


def test_a_retried_run_starts_again_only_once_the_last_one_is_torn_down(scripted_event):
    # A teardown slower than the dispatcher's rescan: the submission must not be claimed
    # again while its last run still holds what it ran on (CI once lost it this way:
    # ('new', 2) after "KeyError: 'spot'" when the two runs shared a slot).
    config = scripted_event(["spot"])
    ScriptedWorker.script.update(spot=["interrupted", "ok"])
    ScriptedWorker.teardown_delay.update(spot=3.0)
    Dispatcher(config).run()
    with Ledger(config.ledger_path) as ledger:
        submission = ledger.get("spot")
    assert (submission.state, submission.attempts) == ("scored", 1)
    assert [event for event, _ in ScriptedWorker.calls] == [
        "setup", "teardown", "setup", "teardown"]


def test_retries_are_bounded_by_max_attempts(scripted_event):
    config = scripted_event(["unlucky"], max_attempts=2)
    ScriptedWorker.script.update(unlucky=["setup_fails", "setup_fails", "ok"])
    Dispatcher(config).run()
    with Ledger(config.ledger_path) as ledger:
        submission = ledger.get("unlucky")
    assert (submission.state, submission.attempts) == ("checking_error", 2)
    assert "gave up after 2 attempts" in submission.error_msg
    assert "the instance never answered" in submission.error_msg


def test_slow_setup_does_not_hold_up_other_slots(scripted_event):
    config = scripted_event(["slow", "fast"])
    ScriptedWorker.script.update(slow=["ok"], fast=["ok"])
    ScriptedWorker.setup_delay.update(slow=3.0)
    Dispatcher(config).run()
    with Ledger(config.ledger_path) as ledger:
        order = [(t.name, t.to_state) for t in ledger.transitions()]
    assert order.index(("fast", "scored")) < order.index(("slow", "training"))


def test_a_slot_is_free_once_its_run_ends_not_once_it_is_scored(scripted_event):
    config = scripted_event(["first", "second"], n_workers=1)
    ScriptedWorker.script.update(first=["ok"], second=["ok"])
    ScriptedWorker.collect_delay.update(first=3.0)
    Dispatcher(config).run()
    with Ledger(config.ledger_path) as ledger:
        order = [(t.name, t.to_state) for t in ledger.transitions()]
        states = {s.name: s.state for s in ledger.all()}
    assert states == {"first": "scored", "second": "scored"}
    # One slot: the second ran while the first was still being collected.
    assert order.index(("second", "training")) < order.index(("first", "scored"))
