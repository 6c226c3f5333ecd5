"""``ramp-runner logs --follow`` on a run on a Dask cluster (``dask scheduler`` and ``dask
worker`` processes on 127.0.0.1): the task sends its log's new bytes as events, the
dispatcher keeps them, the command shows them while the run runs."""

from __future__ import annotations

from runner.dask import task as dask_task
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


def test_follow_a_run_on_a_dask_cluster(plain_cluster, tmp_path):
    # The stand-in conda environment has no python the sandbox can run (the ingestion of
    # hidden test labels needs one): ramp-test's path.
    section = {"worker_type": "dask", "dask_scheduler": plain_cluster.address,
               "conda_env": "ramp-iris", "hidden_test_labels": "off", "timeout": 120}
    path = make_event(tmp_path / "event", (), worker=section,
                      dispatcher={"n_workers": 1, "hunger_policy": "exit"})
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
    assert followed.state_at_first_line == "training"
    assert any(FIRST_LINE in line for line in followed.lines)
    assert any(LAST_LINE in line for line in followed.lines)
    assert r"CHATTY line 2 \x1b]0;owned\x07 \x1b[2J \u202eevil" in followed.lines
    assert b"\x1b" not in followed.raw
    assert followed.lines[-1] == f"{NAME}: scored"
    assert not (ledger.parent / f"{ledger.name}.live" / f"{NAME}.log").exists()
    # What the scheduler keeps of the live topic: this run's bytes, each event bounded.
    with plain_cluster.client() as client:
        events = client.get_events(dask_task.LIVE_TOPIC)
    assert events and all(len(message["data"]) <= 64 * 1024 for _, message in events)
