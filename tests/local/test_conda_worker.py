"""CondaEnvWorker: real ramp-test runs of the example kit."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psutil
import pytest

from runner.config import load_event_config
from runner.errors import EventError
from runner.local.conda import CondaError, conda_env_prefix
from runner.local.worker import CondaEnvWorker
from tests.events import ENV_DUMP_CLASSIFIER, environment_in_log, make_event


@pytest.fixture
def event(tmp_path):
    """An event with the good, raising and hanging example submissions."""
    path = make_event(tmp_path / "event",
                      submissions=("starting_kit", "raising_error", "hanging"),
                      worker={"timeout": 120}, dispatcher={"n_threads": 3})
    config = load_event_config(path)
    from runner.dispatcher import prepare_data

    assert prepare_data(config.worker.data_dir)
    return config


def _worker(config, submission, **overrides):
    return CondaEnvWorker({**config.worker_dict(), **overrides}, submission)


def test_good_submission_runs_and_its_output_is_collected(event):
    worker = _worker(event, "starting_kit")
    returncode, error_msg = worker.launch()
    assert (returncode, error_msg) == (0, "")
    assert worker.status == "killed"
    predictions = Path(event.worker.predictions_dir) / "starting_kit"
    assert (predictions / "fold_0").is_dir()
    assert (predictions / "bagged_scores.csv").is_file()
    log = (Path(event.worker.logs_dir) / "starting_kit" / "log").read_text()
    assert "Testing Iris classification" in log or "acc" in log
    assert worker.peak_memory_mb is not None and worker.peak_memory_mb > 10
    # The run happened in scratch: the participant's folder is left as it was.
    assert not (Path(event.worker.submissions_dir) / "starting_kit" / "training_output").exists()
    assert not worker._scratch.exists()


def test_failing_submission_returns_its_traceback(event):
    returncode, error_msg = _worker(event, "raising_error").launch()
    assert returncode != 0
    assert error_msg.startswith("Traceback")
    assert "RuntimeError" in error_msg
    assert not (Path(event.worker.predictions_dir) / "raising_error").exists()


def test_timeout_kills_the_whole_process_tree(event):
    worker = _worker(event, "hanging", timeout=8)
    worker.setup()
    worker.launch_submission()
    leader = psutil.Process(worker._run.pid)
    descendants, run = [], []
    deadline = time.monotonic() + 7
    # The submission forks a sleeping child from fit(): wait until it shows (beside the
    # sandbox's own two bwrap processes).
    while time.monotonic() < deadline and len(run) < 2:
        descendants = leader.children(recursive=True)
        run = [p for p in descendants if p.name() != "bwrap"]
        time.sleep(0.1)
    assert len(run) == 2, "expected ramp-test and the child it forked"
    tree = [leader, *descendants]
    while worker.status == "running":
        worker.wait(worker.timeout)
    assert worker.status == "timeout"
    returncode, error_msg = worker.collect_results()
    worker.teardown()
    assert returncode == 124
    assert "timeout=8" in error_msg
    survivors = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert survivors == []
    assert "timeout=8" in (Path(event.worker.logs_dir) / "hanging" / "log").read_text()


def test_child_environment_carries_no_secret(event, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-in-dispatcher")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("OSF_PASSWORD", "osf-secret")
    submission = Path(event.worker.submissions_dir) / "env_dump"
    submission.mkdir()
    (submission / "classifier.py").write_text(ENV_DUMP_CLASSIFIER)
    _worker(event, "env_dump").launch()
    log = (Path(event.worker.logs_dir) / "env_dump" / "log").read_text()
    environment = environment_in_log(log)
    assert not [name for name in environment if name.startswith("AWS_")]
    assert "OSF_PASSWORD" not in environment
    assert "secret" not in log
    assert environment["OMP_NUM_THREADS"] == environment["OPENBLAS_NUM_THREADS"] == "3"


def test_named_conda_env_is_resolved_with_conda_info(event, fake_conda):
    assert conda_env_prefix("ramp-iris") == fake_conda
    assert conda_env_prefix(None) == Path(sys.prefix)
    worker = _worker(event, "starting_kit", conda_env="ramp-iris")
    assert worker.launch() == (0, "")


def test_unknown_conda_env_is_a_value_error(event, fake_conda):
    worker = _worker(event, "starting_kit", conda_env="ramp-irsi")
    with pytest.raises(ValueError, match="unknown conda environment 'ramp-irsi'; known: "
                                         "base, ramp-iris"):
        worker.setup()


def test_named_env_without_conda_is_an_error(event, monkeypatch):
    monkeypatch.delenv("CONDA_EXE", raising=False)
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    assert conda_env_prefix(None) == Path(sys.prefix)  # falls back to this environment
    with pytest.raises(CondaError, match="no conda was found"):
        conda_env_prefix("ramp-iris")


def test_contract_misuse_raises_value_error(event):
    worker = _worker(event, "starting_kit")
    with pytest.raises(ValueError, match="call setup"):
        worker.launch_submission()
    with pytest.raises(ValueError, match="nothing to collect"):
        worker.collect_results()
    worker.setup()
    worker.launch_submission()
    with pytest.raises(ValueError, match="already launched"):
        worker.launch_submission()
    with pytest.raises(ValueError, match="collect_results"):
        worker.teardown()
    assert worker.collect_results()[0] == 0
    worker.teardown()


def test_missing_required_key_is_named_at_setup(event):
    config = event.worker_dict()
    del config["kit_dir"]
    worker = CondaEnvWorker(config, "starting_kit")  # checked at setup, as in RAMP
    with pytest.raises(EventError, match=r"required the parameter 'kit_dir'.*worker\.kit_dir"):
        worker.setup()


def test_missing_submission_folder_fails_setup(event):
    with pytest.raises(ValueError, match="does not exist"):
        _worker(event, "no_such_submission").setup()
