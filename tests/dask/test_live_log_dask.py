"""``ramp-runner logs --follow`` on a run on a Dask cluster (``dask scheduler`` and ``dask
worker`` processes on 127.0.0.1): the task sends its log's new bytes as events, the
dispatcher keeps them, the command shows them while the run runs."""

from __future__ import annotations

from runner.dask import task as dask_task
from tests.chatty import add_chatty, assert_followed_to_scored, dispatch_and_follow
from tests.events import make_event


def test_follow_a_run_on_a_dask_cluster(plain_cluster, tmp_path):
    section = {"worker_type": "dask", "dask_scheduler": plain_cluster.address,
               "conda_env": "ramp-iris", "timeout": 120}
    path = make_event(tmp_path / "event", (), worker=section,
                      dispatcher={"n_workers": 1, "hunger_policy": "exit"})
    add_chatty(path)
    assert_followed_to_scored(dispatch_and_follow(path), path)
    # What the scheduler keeps of the live topic: this run's bytes, each event bounded.
    with plain_cluster.client() as client:
        events = client.get_events(dask_task.LIVE_TOPIC)
    assert events and all(len(message["data"]) <= 64 * 1024 for _, message in events)
