"""Adding submissions to an event, and a dispatcher that waits for them."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from runner.config import load_event_config
from runner.dispatcher import Dispatcher, prepare_data
from runner.ledger import Ledger
from runner.submissions import Intake, submit, valid_name
from tests.events import EXAMPLE, make_event


@pytest.fixture
def config(tmp_path):
    return load_event_config(make_event(tmp_path / "event", ("starting_kit",),
                                        dispatcher={"hunger_policy": None}))


def test_submit_copies_and_queues(config):
    name = submit(config, EXAMPLE / "submissions" / "random_forest", name="rf_v1")
    assert name == "rf_v1"
    assert (Path(config.worker.submissions_dir) / "rf_v1" / "classifier.py").is_file()
    with Ledger(config.ledger_path) as ledger:
        assert ledger.get("rf_v1").state == "new"


@pytest.mark.parametrize(("name", "message"), [
    ("../escape", "expected letters"),
    (".hidden", "expected letters"),
    ("starting_kit", "already exists"),
])
def test_submit_refuses_bad_names(config, name, message):
    with pytest.raises(ValueError, match=message):
        submit(config, EXAMPLE / "submissions" / "random_forest", name=name)


def test_intake_skips_hidden_folders_and_files(tmp_path, monkeypatch):
    monkeypatch.setattr("runner.submissions.QUIET_SECONDS", 0)
    (tmp_path / "a").mkdir()
    (tmp_path / ".b.incoming").mkdir()
    (tmp_path / "notes.txt").write_text("not a submission")
    intake = Intake(tmp_path)
    assert intake.ready() == ["a"]
    assert intake.ready() == []
    assert Intake(tmp_path / "missing").ready() == []


def test_prepare_data_failure_is_reported(tmp_path):
    (tmp_path / "prepare_data.py").write_text("raise SystemExit('no network here')\n")
    with pytest.raises(RuntimeError, match="no network here"):
        prepare_data(tmp_path)


def test_hunger_policy_none_waits_for_new_submissions(config):
    dispatcher = Dispatcher(config)
    thread = threading.Thread(target=dispatcher.run)
    thread.start()
    try:
        _wait_until(config, "starting_kit", "scored")
        assert thread.is_alive()  # nothing left to run, yet it keeps waiting
        submit(config, EXAMPLE / "submissions" / "random_forest")
        _wait_until(config, "random_forest", "scored")
        assert thread.is_alive()
    finally:
        dispatcher.stop()
        thread.join(60)
    assert not thread.is_alive()


def _wait_until(config, name, state, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if config.ledger_path.exists():
            with Ledger(config.ledger_path) as ledger:
                if name in ledger.names() and ledger.get(name).state == state:
                    return
        time.sleep(0.2)
    raise AssertionError(f"{name} did not reach {state} within {timeout} s")


def test_a_folder_still_settling_wakes_the_dispatcher_once_it_can_be_quiet(tmp_path):
    """A folder created in place is judged again as soon as it can have been quiet for
    QUIET_SECONDS, not at the next rescan (2 s later): a queue copied in just before the
    dispatcher starts waits one quiet period, no more."""
    from runner.dispatcher import IDLE_RESCAN_SECONDS
    from runner.source import FolderSource

    config = load_event_config(make_event(tmp_path / "event", ()))
    woken = threading.Event()
    source = FolderSource(config)
    with source.opened(), source.watch(woken.set):
        (Path(config.worker.submissions_dir) / "copied").mkdir()
        time.sleep(0.2)  # the watch saw the mkdir: only the intake's timer may wake it now
        woken.clear()
        source.intake()
        assert source.count_new() == 1  # pending, not ready yet
        assert woken.wait(IDLE_RESCAN_SECONDS - 0.3)
        source.intake()
        assert source.names() == {"copied"}


@pytest.mark.parametrize("name", ["a", "team/sub", "t-1/s.2_x", f"{'t' * 64}/{'s' * 64}"])
def test_a_name_is_a_submission_or_a_team_and_a_submission(name):
    assert valid_name(name)


@pytest.mark.parametrize("name", [
    "a/b/c", "../x", "team/..", "team/.hidden", "/abs", "team/", "/", "team//sub",
    f"{'t' * 65}/s", f"t/{'s' * 65}", "team/sub\n", "team\\sub", ""])
def test_names_that_climb_nest_or_grow_are_refused(name):
    assert not valid_name(name)


def test_intake_takes_team_folders_and_what_sits_in_them(tmp_path, monkeypatch):
    monkeypatch.setattr("runner.submissions.QUIET_SECONDS", 0)
    (tmp_path / "alice" / "rf").mkdir(parents=True)
    (tmp_path / "alice" / "gb").mkdir()
    (tmp_path / "alice" / ".gb2.incoming").mkdir()  # staging: skipped
    (tmp_path / "alice" / "link").symlink_to(tmp_path / "alice" / "rf")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "classifier.py").write_text("")
    (tmp_path / "flat" / "data").mkdir()  # a submission with a folder: still a submission
    (tmp_path / "empty").mkdir()  # as before team folders: a submission
    intake = Intake(tmp_path)
    assert intake.ready() == ["empty", "flat", "alice/gb", "alice/rf"]
    assert set(intake.teams) == {"alice"}
    # Once a team folder, a file in it is skipped (before, it would make it a submission).
    (tmp_path / "alice" / "notes.txt").write_text("not a submission")
    (tmp_path / "alice" / "late").mkdir()
    (tmp_path / "bob" / "b1").mkdir(parents=True)
    assert intake.ready() == ["alice/late", "bob/b1"]
    # A dispatcher started again knows alice's folder from the ledger's names.
    assert Intake(tmp_path, ["alice/rf", "empty"]).ready() == [
        "flat", "alice/gb", "alice/late", "bob/b1"]


def test_submit_into_a_team_folder(config):
    assert submit(config, EXAMPLE / "submissions" / "random_forest", "alice/rf") == "alice/rf"
    submit(config, EXAMPLE / "submissions" / "random_forest", "alice/rf2")
    folder = Path(config.worker.submissions_dir)
    assert (folder / "alice" / "rf" / "classifier.py").is_file()
    assert sorted(p.name for p in (folder / "alice").iterdir()) == ["rf", "rf2"]
    with Ledger(config.ledger_path) as ledger:
        assert ledger.get("alice/rf2").team == "alice"
    for name, message in (("starting_kit/x", "not a team folder"), ("alice", "already exists"),
                          ("alice/rf", "already exists"), ("alice/../x", "expected")):
        with pytest.raises(ValueError, match=message):
            submit(config, EXAMPLE / "submissions" / "random_forest", name)


def test_a_team_folder_renamed_in_brings_its_submissions_complete(tmp_path):
    """As submit makes a new team: its first submission starts at once, not a quiet
    period later."""
    (tmp_path / ".bob.incoming" / "b1").mkdir(parents=True)
    intake = Intake(tmp_path)
    assert intake.ready() == []
    (tmp_path / ".bob.incoming").rename(tmp_path / "bob")
    intake.arrived_by_rename("bob")
    assert intake.ready() == ["bob/b1"]


def test_a_submission_renamed_into_a_team_folder_wakes_the_dispatcher(tmp_path):
    """Each team folder is watched once found: a submission renamed into it (as submit
    does) is taken at the wake-up, not at the next rescan a quiet period later."""
    from runner.source import FolderSource

    config = load_event_config(make_event(tmp_path / "event", ()))
    submissions = Path(config.worker.submissions_dir)
    woken = threading.Event()
    source = FolderSource(config)
    with source.opened(), source.watch(woken.set):
        source.intake()  # as the dispatcher's loop does at once
        (submissions / ".alice.incoming" / "a0").mkdir(parents=True)
        time.sleep(0.2)  # the staging's creation woke it: only the rename may now
        woken.clear()
        (submissions / ".alice.incoming").rename(submissions / "alice")
        assert woken.wait(1.0)
        source.intake()
        assert source.names() == {"alice/a0"}
        woken.clear()
        (submissions / "alice" / ".a1.incoming").mkdir()
        time.sleep(0.2)
        woken.clear()
        (submissions / "alice" / ".a1.incoming").rename(submissions / "alice" / "a1")
        assert woken.wait(1.0)
        source.intake()
        assert source.names() == {"alice/a0", "alice/a1"}
