"""Who is at fault decides the state; the worker's status moves only along its table."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from runner import ramptest, results
from runner.config import load_event_config
from runner.dispatcher import Dispatcher
from runner.errors import EventError, SubmissionError
from runner.ledger import Ledger
from runner.local.worker import CondaEnvWorker
from runner.worker import BaseWorker, ContractError, WorkerStatus
from tests.events import install_fake_conda, make_event

SILENT_RAMP_TEST = """#!/bin/sh
echo "ramp-test stand-in: says it worked, writes nothing"
exit 0
"""


@pytest.fixture
def silent_env(tmp_path, monkeypatch):
    """A conda environment ``silent`` whose ramp-test exits 0 without any output."""
    prefix = tmp_path / "envs" / "silent"
    (prefix / "bin").mkdir(parents=True)
    ramp_test = prefix / "bin" / "ramp-test"
    ramp_test.write_text(SILENT_RAMP_TEST)
    ramp_test.chmod(ramp_test.stat().st_mode | stat.S_IEXEC)
    conda = install_fake_conda(tmp_path / "conda-bin", {"silent": prefix})
    monkeypatch.delenv("CONDA_EXE", raising=False)
    monkeypatch.setenv("PATH", f"{conda.parent}:{os.environ['PATH']}")
    return "silent"


def test_ramp_test_exiting_0_without_output_is_a_training_error_not_a_retry(tmp_path,
                                                                              silent_env):
    config = load_event_config(make_event(tmp_path / "event", ("starting_kit",),
                                          worker={"conda_env": silent_env,
                                                  "hidden_test_labels": "off"}))
    Dispatcher(config).run()
    with Ledger(config.ledger_path) as ledger:
        submission = ledger.get("starting_kit")
        lost = [t for t in ledger.transitions("starting_kit") if t.to_state == "new"]
    assert (submission.state, submission.attempts) == ("training_error", 0)
    assert "exited with 0 but left no training_output" in submission.error_msg
    assert submission.error_msg.endswith("\nramp-runner: the run exited with code 0")
    assert len(lost) == 1  # only its discovery: never sent back as a lost run
    log = (Path(config.worker.logs_dir) / "starting_kit" / "log").read_text()
    assert "says it worked" in log


class FailingSetupWorker(BaseWorker):
    """Fails its setup with the exception class named by the submission."""

    errors = {
        "event_fault": EventError("the kit folder is gone"),
        "submission_fault": SubmissionError("the submission's archive is corrupt"),
        "machine_fault": ConnectionError("the host went away"),
    }

    def setup(self):
        raise self.errors[self.submission]

    def _is_submission_finished(self):
        return True


def test_who_is_at_fault_decides_the_state(tmp_path, monkeypatch):
    monkeypatch.setattr("runner.dispatcher.worker_class", lambda worker_type: FailingSetupWorker)
    config = load_event_config(make_event(tmp_path, (), dispatcher={"max_attempts": 2}))
    for name in FailingSetupWorker.errors:
        (Path(config.worker.submissions_dir) / name).mkdir(parents=True)
    Dispatcher(config).run()
    with Ledger(config.ledger_path) as ledger:
        found = {s.name: (s.state, s.attempts) for s in ledger.all()}
        machine = ledger.get("machine_fault")
    assert found == {
        "event_fault": ("checking_error", 0),
        "submission_fault": ("training_error", 0),
        "machine_fault": ("checking_error", 2),  # retried, then given up
    }
    assert "gave up after 2 attempts" in machine.error_msg
    assert "the host went away" in machine.error_msg


class SkipsAhead(BaseWorker):
    """A seed-style worker that claims results it never collected."""

    def setup(self):
        super().setup()
        self.status = "collected"

    def _is_submission_finished(self):
        return True


def test_status_moves_only_along_the_table(tmp_path):
    config = load_event_config(make_event(tmp_path, ()))
    worker = SkipsAhead(config.worker_dict(), "anything")
    with pytest.raises(ContractError, match="cannot go from setup to collected"):
        worker.setup()
    assert worker.status == WorkerStatus.SETUP
    with pytest.raises(ValueError, match="unknown worker status 'done'"):
        worker.status = "done"


def test_teardown_after_a_failed_collect_releases_everything(tmp_path, fake_conda):
    config = load_event_config(make_event(tmp_path, ("starting_kit",)))
    # A predictions folder that cannot be made: installing the results fails.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    settings = config.worker_dict()
    settings["predictions_dir"] = str(blocker / "predictions")
    worker = CondaEnvWorker(settings, "starting_kit")
    worker.setup()
    worker.launch_submission()
    with pytest.raises(ContractError, match="collect_results"):
        worker.teardown()  # misuse while the results wait: refused, nothing touched
    assert worker.scratch.is_dir()
    with pytest.raises(NotADirectoryError):
        worker.collect_results()
    assert worker.status == WorkerStatus.ERROR
    worker.teardown()
    assert worker.status == WorkerStatus.KILLED
    assert not worker.scratch.exists()
    assert worker._run.returncode is not None


def test_the_failed_folds_error_file_is_read_from_its_end_and_never_through_a_link(tmp_path):
    output = tmp_path / "training_output"
    (output / "fold_0").mkdir(parents=True)
    (output / "fold_1").mkdir()
    with open(output / "fold_1" / "error.txt", "wb") as handle:
        handle.truncate(600 * 1024 * 1024)  # a 600 MB one-line file, sparse
        handle.seek(0, 2)
        handle.write(b"ValueError: the end\n")
    error = results.fold_error(output)
    assert len(error) <= ramptest.ERROR_FILE_TAIL_BYTES and error.endswith("ValueError: the end\n")
    secret = tmp_path / "elsewhere"
    secret.mkdir()
    (secret / "error.txt").write_text("not the run's")
    (output / "fold_1" / "error.txt").unlink()
    (output / "fold_1").rmdir()
    (output / "fold_1").symlink_to(secret)
    assert results.fold_error(output) is None
