"""``ramp-runner logs --follow`` on a run on an SSH host (a real sshd on 127.0.0.1): the
dispatcher brings the log's new bytes at each poll, the command shows them while the run
runs and ends with the state it ended in."""

from __future__ import annotations

from tests.chatty import add_chatty, assert_followed_to_scored, dispatch_and_follow
from tests.events import make_event
from tests.sshd import remote_dispatcher, ssh_worker_section


def test_follow_a_run_on_an_ssh_host(tmp_path, sshd, remote_kit):
    path = make_event(tmp_path / "event", (), worker=ssh_worker_section(sshd, remote_kit),
                      dispatcher=remote_dispatcher(time_between_collection=0.5))
    add_chatty(path)
    # Shown while the run still ran on the host, brought by a poll.
    assert_followed_to_scored(dispatch_and_follow(path), path)
