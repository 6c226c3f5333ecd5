"""The installed ``ramp-runner`` console script, run as an organiser runs it: in a
subprocess, on copies of the example event, reading its output and exit code."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import psutil
import pytest
import yaml

from runner.cli import namespace
from runner.ledger import Ledger
from tests.events import make_event, register_worker

REPO = Path(__file__).resolve().parent.parent
PROGRAM = str(Path(sys.executable).with_name("ramp-runner"))
# A message that rich would read as markup if it were not escaped.
MARKUP_NAME = "markup_error"  # folder names are limited to [A-Za-z0-9_.-]
MARKUP_ERROR = "closing [/] before [bold]anything[/bold]"
MARKUP_CLASSIFIER = f'''
class Classifier:
    def fit(self, X, y):
        raise RuntimeError({MARKUP_ERROR!r})

    def predict_proba(self, X):
        raise RuntimeError("never reached")
'''
SUMMARY = re.compile(r"^(\d+ (scored|training_error|checking_error)(, )?)+ in \d+ s$", re.M)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def ramp_runner(*arguments: str, env: dict[str, str] | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the console script, piped (COLUMNS=80 so tables are drawn at 80 columns)."""
    environment = {**os.environ, "COLUMNS": "80"}
    environment.pop("RAMP_EVENT_CONFIG", None)
    environment.update(env or {})
    return subprocess.run([PROGRAM, *arguments], capture_output=True, text=True,
                          timeout=timeout, env=environment)


def under_terminal(argv: list[str], columns: int = 80, timeout: float = 300) -> tuple[int, str]:
    """Run ``argv`` on a pseudo-terminal ``columns`` wide; return its exit code and output."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color"}
    env.pop("COLUMNS", None)
    process = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower, env=env,
                               start_new_session=True)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the program ended
                break
            if not chunk:
                break
            chunks.append(chunk)
        elif process.poll() is not None:
            break
    os.close(leader)
    return process.wait(timeout), b"".join(chunks).decode(errors="replace")


# -- one event, dispatched once on a terminal and once piped ------------------------------

@pytest.fixture(scope="module")
def event(tmp_path_factory):
    """The example's starting_kit and raising_error plus a submission whose name and error
    look like rich markup; dispatched on an 80-column terminal, then again piped after a
    rerun of starting_kit."""
    root = tmp_path_factory.mktemp("event")
    path = make_event(root, ("starting_kit", "raising_error"), worker={"timeout": 60})
    (root / "submissions" / MARKUP_NAME).mkdir()
    (root / "submissions" / MARKUP_NAME / "classifier.py").write_text(MARKUP_CLASSIFIER)
    code, screen = under_terminal([PROGRAM, "dispatch", "-e", str(path)])
    assert ramp_runner("rerun", "-s", "starting_kit", "-e", str(path)).returncode == 0
    piped = ramp_runner("dispatch", "-e", str(path))
    return path, code, screen, piped


def test_dispatch_on_a_terminal_shows_slots_states_and_a_summary(event):
    path, code, screen, _ = event
    assert code == 0, screen
    plain = ANSI.sub("", screen)
    # The live part: a slot with its elapsed time out of the timeout, counts per state.
    assert re.search(r"starting_kit\s+(sent_to_training|training)\s+\d+ s / 60 s", plain)
    assert re.search(r"\d running · .*\d+ s", plain)
    # State changes, each printed once, the markup-looking name as written.
    for name, state in (("starting_kit", "scored"), ("raising_error", "training_error"),
                        (MARKUP_NAME, "training_error")):
        assert len(re.findall(rf"\d\d:\d\d:\d\d  {re.escape(name)}  {state}", plain)) == 1
    assert SUMMARY.search(plain.replace("\r", "")).group(0).startswith(
        "1 scored, 2 training_error in ")
    # The per-step log is in the file beside the ledger, not on the terminal.
    log = path.with_name("ramp-runner.log").read_text()
    assert "starting_kit: sent_to_training" in log
    assert "starting_kit: sent_to_training" not in plain
    assert "torn down" not in plain and "Traceback" not in plain


def test_dispatch_piped_prints_plain_lines(event):
    _, _, _, piped = event
    assert piped.returncode == 0, piped.stderr
    assert "\x1b" not in piped.stdout
    lines = piped.stdout.splitlines()
    assert any(re.fullmatch(r"\d\d:\d\d:\d\d  starting_kit  scored", line) for line in lines)
    assert "1 scored in " in piped.stdout
    # Warnings once: no conda here, said by the preflight, not once per submission.
    assert piped.stderr.count("no conda found") == 1


def test_status_escapes_markup_and_keeps_names_whole_at_80_columns(event):
    path = event[0]
    result = ramp_runner("status", "-e", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines)
    rows = {line.split()[0]: line for line in lines if line.split()[:1] and line.split()[0] in
            ("starting_kit", "raising_error", MARKUP_NAME)}
    assert set(rows) == {"starting_kit", "raising_error", MARKUP_NAME}
    assert "training_error" in rows[MARKUP_NAME]
    # The message wraps in its column, shown as written (rich would eat the tags).
    assert "RuntimeError: closing" in result.stdout and " [/] " in result.stdout
    assert "[bold]anything[/bold]" in result.stdout
    # starting_kit ran twice (rerun); the error column shows only the last line.
    assert re.search(r"starting_kit\s+scored\s+2\s", rows["starting_kit"])
    assert "Traceback" not in result.stdout


def test_status_of_one_submission_shows_the_whole_error(event):
    path = event[0]
    result = ramp_runner("status", "-e", str(path), "--submission", MARKUP_NAME)
    assert result.returncode == 0, result.stderr
    assert "Traceback (most recent call last)" in result.stdout
    assert MARKUP_ERROR in result.stdout.replace("\n", "")
    missing = ramp_runner("status", "-e", str(path), "--submission", "nobody")
    assert missing.returncode == 2 and "no submission 'nobody'" in missing.stderr


def test_leaderboard_at_80_columns_with_real_step_times(event):
    path = event[0]
    result = ramp_runner("leaderboard", "-e", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines)
    header = next(line for line in lines if "submission" in line)
    for column in ("acc", "nll", "f1_70", "train", "valid", "test", "MiB"):
        assert column in header
    row = next(line for line in lines if "starting_kit" in line).split()
    assert row[:2] == ["1", "starting_kit"]
    train, valid, test = map(float, row[5:8])
    assert train > 0 and valid > 0 and test > 0


@pytest.mark.parametrize("split", ["train", "foo"])
def test_leaderboard_refuses_a_split_the_ledger_does_not_rank(event, split):
    result = ramp_runner("leaderboard", "-e", str(event[0]), "--split", split)
    assert result.returncode == 2
    assert f"--split {split!r}: expected one of valid, test" in result.stderr


def test_event_config_from_the_environment(event):
    result = ramp_runner("status", env={"RAMP_EVENT_CONFIG": str(event[0])})
    assert result.returncode == 0 and "starting_kit" in result.stdout


# -- usage --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(namespace.task_names))
def test_every_task_has_help(name):
    result = ramp_runner(name, "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"Usage: ramp-runner [--core-opts] {name}" in result.stdout


def test_minus_e_always_means_the_event_config():
    for context in namespace.to_contexts():
        if "-e" in context.flags:
            assert context.flags["-e"].name == "event_config", context.name


def test_tasks_py_shares_the_program_tasks():
    listed = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(REPO),
                             "--list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    for name in namespace.task_names:
        assert re.search(rf"^\s+{name}\s", listed.stdout, re.M), name
    helped = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(REPO),
                             "submit", "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--folder" in helped.stdout


@pytest.mark.parametrize("arguments, message", [
    (("status",), "no event config: give --event-config/-e FILE or set RAMP_EVENT_CONFIG"),
    (("no-such-task",), "No idea what 'no-such-task' is"),
    (("status", "--no-such-flag"), "No idea what '--no-such-flag' is"),
    (("submit", "-e", "config.yml"), "give the submission folder: --folder/-f PATH"),
])
def test_usage_errors_exit_2(arguments, message):
    result = ramp_runner(*arguments, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr


def test_test_task_passes_options_to_pytest(tmp_path):
    (tmp_path / "test_one.py").write_text("def test_one():\n    assert 1 + 1 == 2\n")
    result = subprocess.run([PROGRAM, "test", "--", "-q", "-p", "no:cacheprovider",
                             "--rootdir", str(tmp_path), str(tmp_path / "test_one.py")],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


# -- what the organiser got wrong: one line, exit 2, nothing started ----------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A copy of the example with one submission; each test writes its own config in it."""
    return make_event(tmp_path_factory.mktemp("organiser"), ("starting_kit",)).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _variant(folder: Path, name: str, worker: dict) -> Path:
    document = yaml.safe_load((folder / "config.yml").read_text())
    document["worker"].update(worker)
    path = folder / f"{name}.yml"
    path.write_text(yaml.safe_dump(document))
    return path


MISTAKES = {
    "kit-typo": ({"kit_dir": "ramp-kits/irs"}, "worker.kit_dir: expected the kit's folder"),
    "kit-no-problem": ({"kit_dir": "submissions"},
                       "worker.kit_dir: expected a kit folder holding problem.py"),
    "no-data": ({"data_dir": "ramp-data/nothing"}, "worker.data_dir: expected the data folder"),
    "no-submissions": ({"submissions_dir": "subs"},
                       "worker.submissions_dir: expected an existing folder"),
    "predictions-in-a-file": ({"predictions_dir": "config.yml/predictions"},
                              "worker.predictions_dir: expected a folder that can be created"),
    "no-scheduler": ({"worker_type": "dask", "dask_scheduler": "tcp://127.0.0.1:{port}"},
                     "worker.dask_scheduler: expected a Dask scheduler listening at"),
}


@pytest.mark.parametrize("task_name", ["check-config", "dispatch"])
@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_organiser_mistakes_fail_before_anything_starts(folder, mistake, task_name):
    worker, expected = MISTAKES[mistake]
    worker = {k: v.format(port=_free_port()) if isinstance(v, str) else v
              for k, v in worker.items()}
    path = _variant(folder, f"{mistake}-{task_name}", worker)
    result = ramp_runner(task_name, "-e", str(path), timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = result.stderr.strip().splitlines()
    assert errors == [f"error: {path}: {expected}" + errors[0].split(expected, 1)[1]]
    assert result.stdout == ""
    assert list(folder.glob(f"ramp-runner-{path.stem}*")) == []  # no ledger, no log
    assert not (folder / "runs").exists()


def test_unknown_conda_env_fails_before_anything_starts(folder, fake_conda):
    path = _variant(folder, "unknown-env", {"conda_env": "ramp-irs"})
    result = ramp_runner("dispatch", "-e", str(path), env={"PATH": os.environ["PATH"]})
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"error: {path}: worker.conda_env: expected an existing conda environment, got "
        "unknown conda environment 'ramp-irs'; known: base, ramp-iris")
    assert list(folder.glob("ramp-runner-unknown-env*")) == []


# -- exit codes of a run ------------------------------------------------------------------

BROKEN_WORKER = '''
from runner.errors import EventError
from runner.worker import BaseWorker


class LicenceServerDown(BaseWorker):
    def setup(self):
        raise EventError("the licence server of the event does not answer")
'''


def test_dispatch_exits_1_when_a_submission_ends_in_checking_error(tmp_path):
    site = tmp_path / "site"
    register_worker(site, "broken", "broken_worker:LicenceServerDown", BROKEN_WORKER)
    path = make_event(tmp_path / "event", ("starting_kit",), worker={"worker_type": "broken"})
    result = ramp_runner("dispatch", "-e", str(path), env={"PYTHONPATH": str(site)})
    assert result.returncode == 1, result.stderr
    assert "starting_kit  checking_error" in result.stdout
    assert "1 checking_error in " in result.stdout


def test_interrupted_dispatch_exits_130_and_gives_the_submission_back(tmp_path):
    path = make_event(tmp_path, ("hanging",), worker={"timeout": 600})
    process = subprocess.Popen([PROGRAM, "dispatch", "-e", str(path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:
            if line.rstrip().endswith("hanging  training"):
                break
        # At once: the signal may come while launch_submission is still starting the run.
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "SIGINT received: stopping" in err
    assert "hanging  new" in out
    with Ledger(path.with_name("ramp-runner.sqlite3")) as ledger:
        assert ledger.get("hanging").state == "new"


# -- the sandbox ----------------------------------------------------------------------------

def test_check_config_says_loudly_when_submissions_are_not_isolated(folder):
    # Without bubblewrap on PATH the sandbox cannot work.
    no_bwrap = {"PATH": str(Path(sys.executable).parent)}
    path = _variant(folder, "sandbox-auto", {"sandbox": "auto"})
    result = ramp_runner("check-config", "-e", str(path), env=no_bwrap)
    assert result.returncode == 0, result.stderr
    assert "SUBMISSIONS ARE NOT ISOLATED" in result.stderr.replace("\n", " ")
    required = _variant(folder, "sandbox-required", {"sandbox": "required"})
    refused = ramp_runner("dispatch", "-e", str(required), env=no_bwrap)
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"error: {required}: worker.sandbox: expected a sandbox "
                                     "that works on this machine")
    assert list(folder.glob("ramp-runner-sandbox-required*")) == []


# -- dask-cluster --port ----------------------------------------------------------------------

def test_example_dask_config_names_the_cluster_default_port():
    from runner.config import load_event_config
    from runner.dask.cluster import DEFAULT_PORT

    config = load_event_config(REPO / "examples" / "iris" / "config-dask.yml")
    assert config.worker.dask_scheduler == f"tcp://127.0.0.1:{DEFAULT_PORT}"
    assert config.ledger_path.name == "ramp-runner-config-dask.sqlite3"


def _dask_cluster(folder: Path, port: int) -> tuple[subprocess.Popen, str]:
    """``ramp-runner dask-cluster`` with one worker, started; its scheduler's address."""
    cluster = subprocess.Popen([PROGRAM, "dask-cluster", "--port", str(port), "--workers", "1",
                                "--folder", str(folder)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address_file = folder / "scheduler-address"
    deadline = time.monotonic() + 120
    while not address_file.exists() and cluster.poll() is None:
        if time.monotonic() > deadline:
            os.killpg(cluster.pid, signal.SIGKILL)
            cluster.wait()
            raise AssertionError("no scheduler address written")
        time.sleep(0.2)
    return cluster, address_file.read_text().strip()


def test_dask_cluster_on_a_given_port_writes_its_address_and_passes_preflight(folder, tmp_path):
    port = _free_port()
    cluster, address = _dask_cluster(tmp_path / "cluster", port)
    try:
        assert address == f"tcp://127.0.0.1:{port}"
        path = _variant(folder, "dask-here", {"worker_type": "dask",
                                              "dask_scheduler": f"tcp://127.0.0.1:{port}"})
        checked = ramp_runner("check-config", "-e", str(path), timeout=60)
        assert checked.returncode == 0, checked.stderr
    finally:
        os.killpg(cluster.pid, signal.SIGINT)
        out = cluster.communicate(timeout=60)[0]
    assert "stopping the cluster" in out


def test_dask_cluster_stops_its_scheduler_and_workers_on_sigterm(tmp_path):
    """SIGTERM to the command alone (as a service manager sends it), not to its group."""
    cluster, _ = _dask_cluster(tmp_path / "cluster", 0)
    try:
        started = psutil.Process(cluster.pid).children(recursive=True)
        assert started, "no scheduler or worker process"
        cluster.send_signal(signal.SIGTERM)
        out = cluster.communicate(timeout=60)[0]
    finally:
        if cluster.poll() is None:
            os.killpg(cluster.pid, signal.SIGKILL)
            cluster.wait()
    assert cluster.returncode == 0, out
    assert "SIGTERM received: stopping" in out and "stopping the cluster" in out, out
    _, alive = psutil.wait_procs(started, timeout=10)
    assert alive == [], alive
