"""Hostile submissions of the example kit, all dispatched at once by a real dispatcher.

One event (module scope) holds an honest rival and one submission per attack of issues 9
and 18; the event runs to its end with the default ``sandbox: auto`` (bubblewrap works on
these machines), small limits and one core per run (``n_threads: 1``), then each test checks
that one attack failed and the event went on. A second, smaller event pits a CPU hog that
never ends against an honest run in the other slot.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from runner import ramptest, sandbox, training_output
from runner.config import load_event_config
from runner.ledger import Ledger
from tests import hostile
from tests.events import make_event

REPO = Path(__file__).resolve().parent.parent
SECRET = "hostile-test-secret-7f3a9c"
ESCAPER_MARK = "hostile-escaper-mark-51be"
LIMITS = {"memory_limit_mb": 600, "output_limit_mb": 48, "log_limit_mb": 1,
          "max_processes": 64}


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if "__pycache__" in path.parts:
            continue
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def event(tmp_path_factory):
    """The event after its dispatcher ran every attack: (config, ledger rows, digests)."""
    assert sandbox.available(), sandbox.probe()[1]
    root = tmp_path_factory.mktemp("hostile")
    path = make_event(root / "event", ("starting_kit",),
                      # ramp-test's path: its output files are what the forgers attack
                      # (with hidden test labels the run writes predictions only).
                      worker={"timeout": 40, "hidden_test_labels": "off", **LIMITS},
                      dispatcher={"n_workers": 2})
    config = load_event_config(path)
    subs = Path(config.worker.submissions_dir)
    kit, data = Path(config.worker.kit_dir), Path(config.worker.data_dir)
    rival = Path(config.worker.predictions_dir) / "starting_kit" / "bagged_scores.csv"
    listener = socket.create_server(("127.0.0.1", 0))
    attacks = {
        "x_steal": hostile.steal_secrets(SECRET, path),
        "x_vandal": hostile.vandal(
            {"kit": kit / "problem.py", "data": data / "prepare_data.py",
             "ledger": config.ledger_path, "logs": Path(config.worker.logs_dir) / "x"},
            rival, wait_seconds=8),
        "x_escaper": hostile.escaper(ESCAPER_MARK, Path(str(config.ledger_path) + ".lock")),
        "x_chatty": hostile.chatty(200),
        "x_hog": hostile.hog(1200),
        "x_threads": hostile.threads(200),
        "x_forks": hostile.fork_chain(),
        "x_filler": hostile.filler(96),
        "x_network": hostile.network(listener.getsockname()[1]),
        **{f"x_forged_{kind}": hostile.forger(kind)
           for kind in ("nan", "inf", "missing", "high", "big")},
        **{f"x_output_{kind}": hostile.bad_output(kind)
           for kind in ("links", "devzero", "fifo", "deleted", "sparse")},
    }
    for name, source in attacks.items():
        hostile.add_submission(subs, name, source)
    from runner.dispatcher import prepare_data

    prepare_data(data)
    before = {"kit": _tree_digest(kit), "data": _tree_digest(data)}
    # The dispatcher runs as `invoke dispatch` with the secret in its environment from its
    # start: /proc/<pid>/environ shows a process's initial environment only.
    try:
        subprocess.run(
            [sys.executable, "-m", "invoke", "--search-root", str(REPO), "dispatch",
             "--event-config", str(path)], env={**os.environ, "RAMP_HOSTILE_SECRET": SECRET},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600, check=True)
    finally:
        listener.close()
    with Ledger(config.ledger_path) as ledger:
        rows = {s.name: s for s in ledger.all()}
    after = {"kit": _tree_digest(kit), "data": _tree_digest(data)}
    return config, rows, before, after


# A few seconds past an honest run (under 6 s with another beside it): the hog waits it out.
CPU_TIMEOUT = 10


@pytest.fixture(scope="module")
def cpu_event(tmp_path_factory):
    """A CPU hog that never ends and an honest rival, dispatched together on 2 slots of one
    core each: (config, ledger rows, ledger transitions)."""
    root = tmp_path_factory.mktemp("cpu")
    path = make_event(root / "event", ("starting_kit",),
                      worker={"timeout": CPU_TIMEOUT, "hidden_test_labels": "off", **LIMITS},
                      dispatcher={"n_workers": 2, "n_threads": 1})
    config = load_event_config(path)
    hostile.add_submission(Path(config.worker.submissions_dir), "x_cpu", hostile.cpu_hog(8))
    subprocess.run(
        [sys.executable, "-m", "invoke", "--search-root", str(REPO), "dispatch",
         "--event-config", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        timeout=600, check=True)
    with Ledger(config.ledger_path) as ledger:
        return config, {s.name: s for s in ledger.all()}, ledger.transitions()


def test_a_cpu_hog_keeps_to_its_core_and_the_other_slot_finishes(cpu_event):
    config, rows, transitions = cpu_event
    assert rows["starting_kit"].state == "scored", rows["starting_kit"].error_msg
    message = _training_error(rows, "x_cpu")
    assert message.splitlines()[-1] == ramptest.timeout_message(CPU_TIMEOUT)
    # 8 busy processes shared one core's worth of time (this machine has 2): the quota holds
    # even when the cores are claimed by other runs of the host and the cpuset is not set.
    shares = [float(line.split()[-1]) for line in _log(config, "x_cpu").splitlines()
              if line.startswith("CPU: share")]
    assert len(shares) == 8, _log(config, "x_cpu")[-2000:]
    assert sum(shares) < 1.3, shares
    # The rival ran beside the hog: claimed together, and scored while the hog still spun.
    claimed = {t.name: t.at for t in transitions if t.to_state == "training"}
    ended = {t.name: t.at for t in transitions if t.to_state in ("scored", "training_error")}
    assert claimed["starting_kit"] < ended["x_cpu"]
    assert ended["starting_kit"] < ended["x_cpu"]


def _log(config, name: str) -> str:
    return (Path(config.worker.logs_dir) / name / "log").read_text(errors="replace")


def _training_error(rows, name: str, *words: str) -> str:
    row = rows[name]
    assert row.state == "training_error", (name, row.state, row.error_msg)
    assert row.attempts == 0, f"{name} was retried: {row.attempts}"
    for word in words:
        assert word in row.error_msg, (name, row.error_msg)
    return row.error_msg


def test_the_rival_and_the_quiet_attacks_are_scored(event):
    _, rows, _, _ = event
    for name in ("starting_kit", "x_steal", "x_vandal", "x_escaper", "x_network"):
        assert rows[name].state == "scored", (name, rows[name].state, rows[name].error_msg)


def test_the_dispatchers_secret_and_config_are_not_readable(event):
    config, _, _, _ = event
    log = _log(config, "x_steal")
    assert "STEAL: secret found in pids none" in log
    assert "STEAL: config DENIED" in log
    assert SECRET not in log


def test_kit_data_ledger_and_logs_cannot_be_written(event):
    config, rows, before, after = event
    log = _log(config, "x_vandal")
    for label in ("kit", "data", "ledger", "logs"):
        assert f"VANDAL: {label} DENIED" in log
    assert after == before
    with sqlite3.connect(config.ledger_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert not (Path(config.worker.logs_dir) / "x").exists()


def test_the_rivals_predictions_and_score_are_intact(event):
    config, rows, _, _ = event
    assert "VANDAL: rival scores DENIED" in _log(config, "x_vandal")
    installed = training_output.read_results(Path(config.worker.predictions_dir) / "starting_kit")
    assert installed.bagged_scores == rows["starting_kit"].scores
    assert rows["starting_kit"].scores["test"]["acc"] > 0.5


@pytest.mark.parametrize(("kind", "words"), [
    ("nan", ("not a finite number",)),
    ("inf", ("not a finite number",)),
    ("missing", ("training_output/bagged_scores.csv: malformed, no column for score",)),
    ("high", ("forged scores refused", "valid acc")),
    ("big", ("bytes (a scores file holds at most",)),
])
def test_forged_scores_are_refused(event, kind, words):
    config, rows, _, _ = event
    assert "FORGER: rewrote" in _log(config, f"x_forged_{kind}")
    _training_error(rows, f"x_forged_{kind}", *words)
    assert not (Path(config.worker.predictions_dir) / f"x_forged_{kind}").exists()


def test_escaped_double_forked_child_is_gone_and_the_lock_is_free(event):
    config, _, _, _ = event
    assert "ESCAPER: lock DENIED" in _log(config, "x_escaper")
    survivors = [p for p in psutil.process_iter(["cmdline"])
                 if ESCAPER_MARK in " ".join(p.info["cmdline"] or ())]
    assert survivors == []
    with open(str(config.ledger_path) + ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_the_log_is_capped_with_head_and_tail(event):
    config, rows, _, _ = event
    message = _training_error(rows, "x_chatty", "log_limit_mb=1")
    log_file = Path(config.worker.logs_dir) / "x_chatty" / "log"
    assert log_file.stat().st_size < 1.1 * 1024 * 1024
    assert "bytes of output cut here" in log_file.read_text()
    assert len(message) <= ramptest.ERROR_MESSAGE_LIMIT + 10


@pytest.mark.parametrize(("name", "limit"), [
    ("x_hog", "memory_limit_mb=600"),
    ("x_threads", "max_processes=64"),
    ("x_forks", "max_processes=64"),
    ("x_filler", "output_limit_mb=48"),
])
def test_each_limit_ends_the_run_naming_it(event, name, limit):
    _, rows, _, _ = event
    message = _training_error(rows, name, limit)
    # ramp-runner's own last line says which limit stopped it.
    ending = message.splitlines()[-1]
    assert ending.startswith(ramptest.ENDING_PREFIX) and limit in ending, message


def test_a_deep_process_tree_is_stopped_at_max_processes(event):
    config, rows, _, _ = event
    words = _log(config, "x_forks").split()
    assert "FORKS:" in words, _log(config, "x_forks")[-2000:]
    # A chain that deep: each process the child of the one before, refused at the cap.
    assert 32 <= int(words[words.index("depth") + 1]) <= LIMITS["max_processes"]
    survivors = [p for p in psutil.process_iter(["cmdline"])
                 if "x_forks" in " ".join(p.info["cmdline"] or ())]
    assert survivors == []


def test_no_network_without_network_true(event):
    config, _, _, _ = event
    assert "NETWORK: connect DENIED" in _log(config, "x_network")


@pytest.mark.parametrize(("kind", "words"), [
    ("links", ("a symbolic link",)),
    ("devzero", ("a symbolic link",)),
    ("fifo", ("a FIFO",)),
    ("deleted", ("no training_output folder",)),
])
def test_links_special_files_and_a_deleted_output_are_the_submissions_error(
        event, kind, words):
    config, rows, _, _ = event
    assert f"SPOILER: done {kind}" in _log(config, f"x_output_{kind}")
    _training_error(rows, f"x_output_{kind}", *words)
    assert not (Path(config.worker.predictions_dir) / f"x_output_{kind}").exists()


def test_a_sparse_terabyte_never_reaches_the_predictions(event):
    config, rows, _, _ = event
    assert "SPARSE: 1 TiB DENIED" in _log(config, "x_output_sparse")
    installed = Path(config.worker.predictions_dir)
    apparent = sum(p.stat().st_size for p in installed.rglob("*") if p.is_file())
    assert apparent < 10 * 1024 * 1024
    # The event went on: every submission reached a final state, nothing left in between.
    assert {row.state for row in rows.values()} <= {"scored", "training_error"}
