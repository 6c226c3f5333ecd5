"""The invoke tasks, run as an organiser runs them: ``invoke <task>`` in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from runner.local.conda import environment_command
from tests.events import make_event

REPO = Path(__file__).resolve().parent.parent


def invoke(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(REPO),
                           *arguments], capture_output=True, text=True, timeout=300)


def test_check_config_prints_a_summary(tmp_path):
    path = make_event(tmp_path, ())
    (tmp_path / "submissions").mkdir()  # an event waiting for its first submission
    result = invoke("check-config", "--event-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "iris_example" in result.stdout
    assert "worker.timeout" in result.stdout


def test_check_config_exits_2_with_the_error(tmp_path):
    path = make_event(tmp_path, ())
    document = yaml.safe_load(path.read_text())
    document["dispatcher"]["n_worker"] = 2
    path.write_text(yaml.safe_dump(document))
    result = invoke("check-config", "--event-config", str(path))
    assert result.returncode == 2
    assert f"{path}: dispatcher.n_worker: expected a known key (did you mean 'n_workers'?)" in (
        result.stderr)


def test_dispatch_status_leaderboard_and_rerun(tmp_path):
    path = make_event(tmp_path, ("starting_kit", "random_forest", "raising_error"))
    dispatched = invoke("dispatch", "--event-config", str(path))
    assert dispatched.returncode == 0, dispatched.stderr

    status = invoke("status", "--event-config", str(path))
    lines = {line.split()[0]: line for line in status.stdout.splitlines() if line.strip()}
    assert "starting_kit" in lines, status.stdout + status.stderr
    assert "scored" in lines["starting_kit"] and "scored" in lines["random_forest"]
    assert "training_error" in lines["raising_error"]

    board = invoke("leaderboard", "--event-config", str(path)).stdout
    ranked = [line.split()[1] for line in board.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert ranked == ["random_forest", "starting_kit"]

    rerun = invoke("rerun", "-s", "raising_error", "--event-config", str(path))
    assert rerun.returncode == 0
    again = invoke("rerun", "-s", "no_such_submission", "--event-config", str(path))
    assert again.returncode == 2 and "no submission 'no_such_submission'" in again.stderr


def test_conda_env_commands_follow_ramp_setup(tmp_path, fake_conda):
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "environment.yml").write_text("name: ramp-iris\n")
    argv = environment_command("create", "ramp-iris", kit)
    assert Path(argv[0]).name == "conda"
    assert argv[1:] == ["env", "create", "--name", "ramp-iris", "--file",
                        str(kit / "environment.yml")]
    assert environment_command("update", "ramp-iris", kit)[2] == "update"
    with pytest.raises(ValueError, match="worker.conda_env"):
        environment_command("create", None, kit)
    with pytest.raises(ValueError, match="environment.yml"):
        environment_command("create", "ramp-iris", tmp_path)
