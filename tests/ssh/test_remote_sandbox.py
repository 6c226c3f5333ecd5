"""Remote runs confined on the host (issue 9): the SSH worker runs ramp-test under the
supervisor and, where bubblewrap works on the host, in its sandbox with the worker's limits.

The host is the real sshd of tests/sshd.py on this machine (root here, with bubblewrap);
the kit is a copy of its own, so that planting a rival there touches no other test.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from runner.config import load_event_config
from runner.dispatcher import Dispatcher
from runner.ledger import Ledger
from runner.ssh import worker as ssh_module
from tests import hostile
from tests.events import make_event
from tests.sshd import VENV_BIN, remote_dispatcher, ssh_worker_section

SECRET = "remote-sandbox-secret-4d1e"


def curious(config_path: Path, secret_file: Path, kit: Path) -> str:
    """Reads the event's config and a secret outside the kit, lists the other submissions,
    writes into the kit and its data; then trains as usual."""
    return hostile.PRELUDE + f'''
DONE = []


def attack_in_fit():
    if DONE:
        return
    DONE.append(True)
    attempt("CURIOUS: config", lambda: OPEN({str(config_path)!r}).read())
    attempt("CURIOUS: secret", lambda: OPEN({str(secret_file)!r}).read())
    attempt("CURIOUS: kit", lambda: OPEN({str(kit / "problem.py")!r}, "ab").write(b"#x\\n"))
    attempt("CURIOUS: data", lambda: OPEN({str(kit / "data" / "train.csv")!r}, "ab").write(b"x"))
    say("CURIOUS: submissions", sorted(f("o" + "s", "list", "dir")({str(kit / "submissions")!r})))
'''


@pytest.fixture(scope="module")
def kit(remote_kit, tmp_path_factory) -> Path:
    """A host kit of this module's own, with a rival's submission already on the host and
    files any user may write: only the sandbox's read-only mount keeps them unchanged."""
    folder = tmp_path_factory.mktemp("sandboxed-host") / "iris"
    shutil.copytree(remote_kit, folder)
    for name in ("problem.py", "data/train.csv"):
        (folder / name).chmod(0o666)
    rival = folder / "submissions" / "rival"
    rival.mkdir(parents=True)
    (rival / "classifier.py").write_text("# the rival's code\n")
    return folder


@pytest.fixture(scope="module")
def hostile_event(sshd, kit, tmp_path_factory):
    """An SSH event with ``sandbox: required`` and a 1 MB log, run by the real dispatcher:
    (config, ledger rows)."""
    root = tmp_path_factory.mktemp("remote-hostile")
    secret = root / "secret.txt"
    secret.write_text(SECRET)
    secret.chmod(0o644)
    path = make_event(root / "event", (),
                      worker=ssh_worker_section(sshd, kit, sandbox="required", log_limit_mb=1,
                                                timeout=60),
                      dispatcher=remote_dispatcher())
    subs = path.parent / "submissions"
    hostile.add_submission(subs, "x_curious", curious(path, secret, kit))
    hostile.add_submission(subs, "x_chatty", hostile.chatty(3))
    config = load_event_config(path)
    Dispatcher(config).run()
    with Ledger(config.ledger_path) as ledger:
        rows = {row.name: row for row in ledger.all()}
    return config, rows


def _log(config, name: str) -> str:
    return (Path(config.worker.logs_dir) / name / "log").read_text(errors="replace")


def test_a_sandboxed_remote_run_sees_neither_the_event_nor_other_submissions(hostile_event,
                                                                              kit):
    config, rows = hostile_event
    assert rows["x_curious"].state == "scored", rows["x_curious"].error_msg
    log = _log(config, "x_curious")
    # Not there at all (not merely forbidden): the sandbox's file system does not hold them.
    assert "CURIOUS: config DENIED FileNotFoundError" in log
    assert "CURIOUS: secret DENIED FileNotFoundError" in log
    assert SECRET not in log
    assert "CURIOUS: kit DENIED OSError [Errno 30] Read-only file system" in log
    # Refused by the read-only mount, or before it by the run's own uid.
    assert ("CURIOUS: data DENIED OSError [Errno 30] Read-only file system" in log
            or "CURIOUS: data DENIED PermissionError [Errno 13] Permission denied" in log)
    assert "CURIOUS: submissions ['x_curious']" in log
    assert not (kit / "problem.py").read_text().endswith("#x\n")
    assert (kit / "submissions" / "rival" / "classifier.py").read_text() == "# the rival's code\n"


def test_a_remote_limit_ends_the_run_as_training_error_naming_it(hostile_event):
    config, rows = hostile_event
    row = rows["x_chatty"]
    assert row.state == "training_error", (row.state, row.error_msg)
    assert "log_limit_mb=1" in row.error_msg
    log_file = Path(config.worker.logs_dir) / "x_chatty" / "log"
    assert log_file.stat().st_size < 1.1 * 1024 * 1024
    assert "bytes of output cut here" in log_file.read_text()


def _broken_bwrap(folder: Path) -> str:
    """A PATH prefix whose ``bwrap`` fails as on a host that forbids user namespaces."""
    folder.mkdir(parents=True, exist_ok=True)
    fake = folder / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    return f"{folder}:{VENV_BIN}"


def test_sandbox_required_on_a_host_where_it_does_not_work_is_checking_error(
        sshd, kit, tmp_path):
    path = make_event(tmp_path / "event", ("starting_kit",), worker=ssh_worker_section(
        sshd, kit, sandbox="required", remote_path_prefix=_broken_bwrap(tmp_path / "bin")),
        dispatcher=remote_dispatcher(max_attempts=1))
    config = load_event_config(path)
    Dispatcher(config).run()
    with Ledger(config.ledger_path) as ledger:
        row = ledger.get("starting_kit")
    assert row.state == "checking_error", (row.state, row.error_msg)
    assert row.attempts == 0
    assert "sandbox: required" in row.error_msg and "uid map" in row.error_msg
    assert not ssh_module.host_in_use(config.worker.hosts[0])
    assert list((kit / ".ramp-runner").iterdir()) == []
    assert sorted(p.name for p in (kit / "submissions").iterdir()) == ["rival"]


def test_sandbox_auto_on_such_a_host_warns_loudly_and_runs_without(sshd, kit, tmp_path,
                                                                    caplog):
    path = make_event(tmp_path / "event", ("starting_kit",), worker=ssh_worker_section(
        sshd, kit, remote_path_prefix=_broken_bwrap(tmp_path / "bin")),
        dispatcher=remote_dispatcher())
    config = load_event_config(path)
    with caplog.at_level(logging.WARNING):
        rows_before = len(caplog.records)
        Dispatcher(config).run()
    with Ledger(config.ledger_path) as ledger:
        row = ledger.get("starting_kit")
    assert row.state == "scored", row.error_msg
    warnings = [r.getMessage() for r in caplog.records[rows_before:]
                if "NOT isolated" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"{sshd.host}:{sshd.port}" in warnings[0] and "uid map" in warnings[0]
