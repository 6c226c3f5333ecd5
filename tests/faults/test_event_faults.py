"""Faults of the machine and the event (disks, folders, the ledger, intake, re-runs): never
the participant's, never retried as lost runs, each one clear line, nothing left behind."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from runner.config import load_event_config
from runner.dispatcher import IDLE_RESCAN_SECONDS, Dispatcher, MachineFault, prepare_data
from runner.eventlock import DispatcherBusy
from runner.ledger import Ledger
from runner.source import FolderSource
from tests.events import EXAMPLE, make_event
from tests.faults.helpers import (
    RAMP_RUNNER,
    dispatch,
    fill,
    start_dispatch,
    states,
    tmpfs,
    wait_for_state,
    wait_until_gone,
)


def _scratch(config) -> Path:
    return config.ledger_path.with_name(config.ledger_path.name + ".scratch")


# -- the event's folders ----------------------------------------------------------------

def test_full_predictions_disk_is_checking_error_once_and_stops(tmp_path):
    with tmpfs(tmp_path / "predictions", size="1m") as predictions:
        fill(predictions)
        config = load_event_config(make_event(
            tmp_path / "event", ("starting_kit", "random_forest"),
            worker={"predictions_dir": str(predictions)}, dispatcher={"n_workers": 1}))
        with pytest.raises(MachineFault, match=r"\[Errno 28\] No space left on device"):
            Dispatcher(config).run()
        final = states(config.ledger_path)
        leftovers = [p.name for p in predictions.iterdir() if not p.name.startswith("filler")]
    failed = [name for name, (state, _, _) in final.items() if state == "checking_error"]
    assert len(failed) == 1  # once, then the dispatcher stopped
    state, attempts, message = final[failed[0]]
    assert attempts == 0 and "No space left on device" in message
    assert message.startswith("the event's files could not be written (not the submission's")
    assert {s for s, _, _ in final.values()} == {"checking_error", "new"}
    assert leftovers == []  # no half-copied predictions
    assert list(_scratch(config).iterdir()) == []


def test_full_logs_disk_leaves_no_half_written_log(tmp_path):
    with tmpfs(tmp_path / "logs", size="1m") as logs:
        fill(logs)
        config = load_event_config(make_event(
            tmp_path / "event", ("starting_kit",), worker={"logs_dir": str(logs)}))
        with pytest.raises(MachineFault, match=r"\[Errno 28\] No space left on device"):
            Dispatcher(config).run()
        leftovers = [str(p.relative_to(logs)) for p in logs.rglob("*")
                     if p.is_file() and not p.name.startswith("filler")]
    assert leftovers == []


def test_read_only_logs_dir_is_checking_error_once_and_stops(tmp_path):
    with tmpfs(tmp_path / "logs", size="1m", options=",ro") as logs:
        config = load_event_config(make_event(
            tmp_path / "event", ("starting_kit", "random_forest"),
            worker={"logs_dir": str(logs)}, dispatcher={"n_workers": 1}))
        with pytest.raises(MachineFault, match="Read-only file system"):
            Dispatcher(config).run()
    final = states(config.ledger_path)
    assert sorted(s for s, _, _ in final.values()) == ["checking_error", "new"]
    assert all(attempts == 0 for _, attempts, _ in final.values())
    assert list(_scratch(config).iterdir()) == []


# -- the ledger -------------------------------------------------------------------------

def test_the_lock_follows_the_ledger_file_not_its_path(tmp_path):
    first = load_event_config(make_event(tmp_path / "a", ()))
    for spelling in ("symlink", "hardlink", "dotdot"):
        other = tmp_path / f"b-{spelling}"
        with FolderSource(first).opened():
            if spelling == "symlink":
                (tmp_path / "link.sqlite3").symlink_to(first.ledger_path)
                ledger = tmp_path / "link.sqlite3"
            elif spelling == "hardlink":
                os.link(first.ledger_path, tmp_path / "hard.sqlite3")
                ledger = tmp_path / "hard.sqlite3"
            else:
                ledger = first.ledger_path.parent / ".." / "a" / first.ledger_path.name
            second = load_event_config(make_event(other, (), dispatcher={"ledger": str(ledger)}))
            with pytest.raises(DispatcherBusy, match="another dispatcher"):
                Dispatcher(second).run()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_ledger_deleted_or_replaced_mid_run_stops_the_dispatcher(tmp_path, how):
    path = make_event(tmp_path, ("hanging",), worker={"timeout": 600},
                      dispatcher={"hunger_policy": None})
    config = load_event_config(path)
    process = start_dispatch(path)
    try:
        wait_for_state(config.ledger_path, "training")
        if how == "deleted":
            config.ledger_path.unlink()
        else:
            shutil.copy(config.ledger_path, tmp_path / "copy.sqlite3")
            os.replace(tmp_path / "copy.sqlite3", config.ledger_path)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 1
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: LedgerError: {config.ledger_path}: the ledger was {how}"
                     + (" while in use" if how == "deleted" else " by another file while in use")]
    assert "Traceback" not in stderr
    assert wait_until_gone(tmp_path) == []


def _one_line_error(config_path: Path) -> str:
    completed = dispatch(config_path, timeout=60)
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


def test_a_ledger_that_is_not_sqlite_is_one_line(tmp_path):
    path = make_event(tmp_path, ("starting_kit",))
    ledger = load_event_config(path).ledger_path
    ledger.write_text("organiser's notes, not a database\n" * 100)
    assert _one_line_error(path) == (
        f"error: LedgerError: {ledger}: not an SQLite database (is ledger the right file?)")


def test_an_immutable_ledger_is_one_line(tmp_path):
    path = make_event(tmp_path, ("starting_kit",))
    ledger = load_event_config(path).ledger_path
    Ledger(ledger).close()
    subprocess.run(["chattr", "+i", str(ledger)], check=True)
    try:
        line = _one_line_error(path)
    finally:
        subprocess.run(["chattr", "-i", str(ledger)], check=True)
    assert line.startswith(f"error: LedgerError: {ledger}: cannot write the ledger")


def test_a_ledger_on_a_full_disk_is_one_line(tmp_path):
    with tmpfs(tmp_path / "disk", size="1m") as disk:
        path = make_event(tmp_path / "event", ("starting_kit",),
                          dispatcher={"ledger": str(disk / "ledger.sqlite3")})
        fill(disk)
        line = _one_line_error(path)
    assert line == f"error: LedgerError: {disk / 'ledger.sqlite3'}: database or disk is full"


# -- intake -----------------------------------------------------------------------------

def _upload_slowly(target: Path, seconds: float, ledger_path: Path) -> list[str]:
    """Create ``target`` and write a file into it piece by piece for ``seconds`` (a slow
    upload, never still for more than a tenth of a second), then the classifier; returns
    the states the ledger gave ``target`` meanwhile (none while it was incomplete)."""
    seen = []
    target.mkdir(parents=True)
    deadline = time.monotonic() + seconds
    with open(target / "weights.bin", "wb") as upload:
        while time.monotonic() < deadline:
            upload.write(b"\0" * 1024)
            upload.flush()
            with Ledger(ledger_path) as ledger:
                state = ledger.get(target.name).state if target.name in ledger.names() else None
                if state is not None and state not in seen:
                    seen.append(state)
            time.sleep(0.1)
    shutil.copy(EXAMPLE / "submissions" / "random_forest" / "classifier.py", target)
    return seen


def test_a_folder_copied_in_slowly_is_run_only_once_complete(tmp_path):
    config = load_event_config(make_event(tmp_path, (), worker={"timeout": 60},
                                          dispatcher={"hunger_policy": None}))
    # Prepared beforehand, so that the dispatcher is in its loop at once (the ledger made).
    prepare_data(config.worker.data_dir)
    dispatcher = Dispatcher(config)
    thread = threading.Thread(target=dispatcher.run)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not config.ledger_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # Longer than two rescans: the dispatcher looks at the half-copied folder (no
        # classifier.py yet) at least twice, woken by its creation and by its rescans.
        seen = _upload_slowly(Path(config.worker.submissions_dir) / "late",
                              2 * IDLE_RESCAN_SECONDS + 1, config.ledger_path)
        assert seen == [], f"taken in while half-copied: {seen}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with Ledger(config.ledger_path) as ledger:
                if "late" in ledger.names() and ledger.get("late").state in (
                        "scored", "training_error", "checking_error"):
                    break
            time.sleep(0.2)
    finally:
        dispatcher.stop()
        thread.join(60)
    assert states(config.ledger_path)["late"] == ("scored", 0, "")


def test_a_symlinked_folder_is_refused_and_said_once(tmp_path, caplog):
    outside = tmp_path / "outside"
    shutil.copytree(EXAMPLE / "submissions" / "starting_kit", outside / "starting_kit",
                    ignore=shutil.ignore_patterns("training_output", "__pycache__"))
    path = make_event(tmp_path / "event", ("starting_kit",))
    config = load_event_config(path)
    (Path(config.worker.submissions_dir) / "borrowed").symlink_to(outside / "starting_kit")
    with caplog.at_level(logging.WARNING, logger="runner.submissions"):
        Dispatcher(config).run()
    assert states(config.ledger_path) == {"starting_kit": ("scored", 0, "")}
    refusals = [r.getMessage() for r in caplog.records if "borrowed" in r.getMessage()]
    assert len(refusals) == 1 and "is a symbolic link" in refusals[0]


# -- re-runs ----------------------------------------------------------------------------

def test_a_rerun_that_fails_leaves_no_old_predictions(tmp_path):
    config = load_event_config(make_event(tmp_path, ("starting_kit",)))
    Dispatcher(config).run()
    predictions = Path(config.worker.predictions_dir) / "starting_kit"
    log = Path(config.worker.logs_dir) / "starting_kit" / "log"
    assert states(config.ledger_path)["starting_kit"][0] == "scored" and predictions.is_dir()

    classifier = Path(config.worker.submissions_dir) / "starting_kit" / "classifier.py"
    classifier.write_text(classifier.read_text().replace(
        "def fit(self, X, y):", "def fit(self, X, y):\n        raise RuntimeError('broken now')"))
    with Ledger(config.ledger_path) as ledger:
        ledger.rerun("starting_kit")
    Dispatcher(config).run()

    assert states(config.ledger_path)["starting_kit"][0] == "training_error"
    assert not predictions.exists()
    assert "broken now" in log.read_text()


# -- preflight (issue 14, the CLI's check-config) ---------------------------------------

@pytest.mark.parametrize(("fault", "key"), [
    ("kit without problem.py", "worker.kit_dir"),
    ("mistyped kit_dir", "worker.kit_dir"),
    ("mistyped data_dir", "worker.data_dir"),
])
def test_check_config_refuses_a_broken_kit_or_data_dir(tmp_path, fault, key):
    worker = {}
    if fault == "mistyped kit_dir":
        worker["kit_dir"] = "ramp-kits/irs"
    elif fault == "mistyped data_dir":
        worker["data_dir"] = "ramp-data/irs"
    path = make_event(tmp_path, ("starting_kit",), worker=worker)
    if fault == "kit without problem.py":
        (tmp_path / "ramp-kits" / "iris" / "problem.py").unlink()
    completed = subprocess.run([RAMP_RUNNER, "check-config", "-e", str(path)],
                               capture_output=True, text=True, timeout=60, check=False)
    output = (completed.stdout + completed.stderr).strip()
    assert completed.returncode == 2, output
    assert output.startswith(f"error: {path}: {key}: expected") and "\n" not in output
