"""The command line's one error boundary: every verb, given a broken ledger or a broken
config, says in one line what is at fault (naming the file) and exits non-zero; none
prints a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runner.config import load_event_config
from tests.events import make_event
from tests.test_cli import ramp_runner

# Every verb that reads the event config, with the arguments it needs besides -e.
EVENT_VERBS = {
    "check-config": [],
    "dispatch": [],
    "status": [],
    "status --submission": ["--submission", "starting_kit"],
    "submit": ["--folder", "{submission}", "--name", "{name}"],
    "rerun": ["--submission", "starting_kit"],
    "leaderboard": [],
    "reap": [],
    "aws-config": ["--outputs-file", "{outputs}"],
    "create-conda-env": [],
}
# Those that open the ledger, and so must refuse a broken one.
LEDGER_VERBS = ("check-config", "dispatch", "status", "status --submission", "submit",
                "rerun", "leaderboard")


@pytest.fixture(scope="module")
def event(tmp_path_factory, fake_conda_module):
    """The example event (its conda env known to a stand-in conda) and a spare submission."""
    root = tmp_path_factory.mktemp("cli-errors")
    config = make_event(root / "event", submissions=("starting_kit",))
    spare = root / "spare"
    shutil.copytree(config.parent / "submissions" / "starting_kit", spare)
    outputs = root / "outputs.json"
    outputs.write_text(json.dumps({"amiBaseName": "ramp-iris", "securityGroupName": "ramp-iris",
                                   "keyName": "ramp-iris", "region": "eu-west-3"}))
    return config, {"submission": str(spare), "outputs": str(outputs)}


def run_verb(verb: str, config: Path, values: dict[str, str]):
    arguments = [argument.format(name="spare", **values)
                 for argument in EVENT_VERBS[verb]]
    return ramp_runner(verb.split()[0], "-e", str(config), *arguments,
                       env={"PATH": os.environ["PATH"]}, timeout=120)


def one_line_naming(completed, what: str) -> str:
    output = (completed.stdout + completed.stderr).strip()
    assert "Traceback" not in output, output
    assert completed.returncode != 0, output
    assert len(output.splitlines()) == 1, output
    assert output.startswith("error: ") and what in output, output
    return output


@pytest.mark.parametrize("broken", ["text file", "folder"])
@pytest.mark.parametrize("verb", LEDGER_VERBS)
def test_every_verb_names_a_broken_ledger_in_one_line(event, verb, broken):
    config, values = event
    ledger = load_event_config(config).ledger_path
    if broken == "folder":
        ledger.mkdir()
    else:
        ledger.write_text("not a database\n" * 100)
    try:
        one_line_naming(run_verb(verb, config, values), str(ledger))
    finally:
        shutil.rmtree(ledger) if ledger.is_dir() else ledger.unlink()
        # A refused submit keeps its copy (the folder source would queue it): start afresh.
        shutil.rmtree(config.parent / "submissions" / "spare", ignore_errors=True)


@pytest.mark.parametrize("verb", list(EVENT_VERBS))
def test_every_verb_names_a_broken_config_in_one_line(event, verb, tmp_path):
    _, values = event
    config = tmp_path / "config.yml"
    config.write_text("ramp:\n  problem_name: [iris\nworker: {}\n")
    output = one_line_naming(run_verb(verb, config, values), str(config))
    assert "YAML" in output


def test_serve_names_a_broken_ramp_config_in_one_line(tmp_path):
    ramp_config = tmp_path / "database.yml"
    ramp_config.write_text("sqlalchemy: [\n")
    completed = ramp_runner("serve", "--ramp-config", str(ramp_config), "--events-dir",
                            str(tmp_path), env={"PATH": os.environ["PATH"]}, timeout=60)
    one_line_naming(completed, str(ramp_config))


def test_a_bug_still_shows_its_traceback(tmp_path):
    """Only the project's own errors are turned into one line: anything else is a bug,
    and its traceback is what a bug report needs."""
    script = tmp_path / "bug.py"
    script.write_text(
        "from runner import cli, config\n"
        "def broken(path):\n"
        "    raise ZeroDivisionError('a bug')\n"
        "config.load_event_config = broken\n"
        "cli.program.run(['ramp-runner', 'status', '-e', 'x.yml'])\n")
    completed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                               timeout=60)
    assert completed.returncode == 1
    assert "Traceback" in completed.stderr and "ZeroDivisionError: a bug" in completed.stderr
