"""``ramp-runner logs --follow`` on a run on an SSH host (a real sshd on 127.0.0.1): the
dispatcher brings the log's new bytes at each poll, the command shows them while the run
runs and ends with the state it ended in."""

from __future__ import annotations

from tests.chatty import (
    FIRST_LINE,
    LAST_LINE,
    NAME,
    add_chatty,
    follow,
    ramp_runner,
    wait_until_training,
)
from tests.events import make_event
from tests.sshd import remote_dispatcher, ssh_worker_section


def test_follow_a_run_on_an_ssh_host(tmp_path, sshd, remote_kit):
    path = make_event(tmp_path / "event", (), worker=ssh_worker_section(sshd, remote_kit),
                      dispatcher=remote_dispatcher(time_between_collection=0.5))
    add_chatty(path)
    ledger = path.with_name("ramp-runner.sqlite3")
    dispatch = ramp_runner("dispatch", "-e", str(path))
    try:
        wait_until_training(ledger, lambda: dispatch.poll() is None)
        followed = follow(path, ledger)
        out, err = dispatch.communicate(timeout=120)
    finally:
        dispatch.kill()
    assert dispatch.returncode == 0, err
    assert followed.returncode == 0, followed.stderr
    # Shown while the run still ran on the host, brought by a poll.
    assert followed.state_at_first_line == "training"
    assert any(FIRST_LINE in line for line in followed.lines)
    assert any(LAST_LINE in line for line in followed.lines)
    assert r"CHATTY line 2 \x1b]0;owned\x07 \x1b[2J \u202eevil" in followed.lines
    assert b"\x1b" not in followed.raw
    assert followed.lines[-1] == f"{NAME}: scored"
    assert not (ledger.parent / f"{ledger.name}.live" / f"{NAME}.log").exists()
