"""The dispatcher over a real RAMP board (ramp-database on SQLite and on PostgreSQL).

Boards are built with ramp-database's own functions from the example kit (tests/rampboard.py)
and read back with its own query functions. Real ramp-test runs, real processes, a real
PostgreSQL stopped and started under a running dispatcher.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import distributed
import psutil
import pytest
from ramp_database.model import Event, EventTeam, Submission
from ramp_database.tools.submission import (
    get_bagged_scores,
    get_scores,
    get_submission_by_id,
    get_submission_error_msg,
    get_submission_max_ram,
    get_submission_state,
    get_submissions,
    get_time,
    set_submission_error_msg,
    set_submission_state,
)
from sqlalchemy import event as sa_event

from runner.config import load_event_config
from runner.dispatcher import Dispatcher
from runner.ledger import Ledger
from runner.ramp_server import load_ramp_event
from runner.rampdb import NO_TRACEBACK_MESSAGE, public_error
from tests.events import make_event
from tests.rampboard import (
    EVENT,
    SUBMISSIONS,
    add_board_event,
    board_session,
    make_board,
    sqlite_database,
)

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)


# -- boards on the real parts (postgres, fake_conda_module: tests/real_parts.py) ----------


@pytest.fixture(scope="module")
def sqlite_board(tmp_path_factory, fake_conda_module):
    root = tmp_path_factory.mktemp("sqlite-board")
    return make_board(root, sqlite_database(root))


@pytest.fixture(scope="module")
def pg_board(tmp_path_factory, postgres, fake_conda_module):
    return make_board(tmp_path_factory.mktemp("pg-board"), postgres.database)


class Counter:
    """Database round trips through an engine: statements and commits."""

    def __init__(self, engine):
        self.statements: list[str] = []
        self.commits = 0
        sa_event.listen(engine, "before_cursor_execute", self._statement)
        sa_event.listen(engine, "commit", self._commit)

    def _statement(self, conn, cursor, statement, *args):
        self.statements.append(statement)

    def _commit(self, conn):
        self.commits += 1

    @property
    def total(self) -> int:
        return len(self.statements) + self.commits


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def dispatched(request):
    """The example submissions added to a board and dispatched, as `invoke dispatch
    --ramp-config --event-config` runs them; with the round trips it cost."""
    board = request.getfixturevalue(f"{request.param.replace('postgresql', 'pg')}_board")
    event_config = add_board_event(board)
    config, source = load_ramp_event(board.ramp_config, event_config)
    counter = Counter(source.engine)
    Dispatcher(config, source=source).run()
    return board, config, source, counter


def _by_name(session, event):
    """{(team, submission name): Submission} of an event."""
    return {(s.team.name, s.name): s for s in session.query(Submission)
            .join(EventTeam).join(Event).filter(Event.name == event)}


# -- the whole event -----------------------------------------------------------------------


def test_board_event_dispatched(dispatched):
    board, config, _, _ = dispatched
    with board_session(board.database) as session:
        subs = _by_name(session, EVENT)
        for team, name, _ in SUBMISSIONS[:2]:
            key = subs[(team, name)].id
            assert get_submission_state(session, key) == "scored"
            scores = get_scores(session, key)
            assert scores.notna().all().all() and len(scores) == 9  # 3 folds x 3 steps
            assert (scores["acc"] > 0.8).all()
            bagged = get_bagged_scores(session, key)
            assert set(bagged.index.get_level_values("step")) == {"valid", "test"}
            times = get_time(session, key)
            assert len(times) == 3 and (times[["train", "valid", "test"]] > 0).all().all()
            assert get_submission_max_ram(session, key) > 10  # MB: a Python with sklearn
            assert subs[(team, name)].queue_position == -1
        failed = subs[("alice", "raising_error")]
        assert get_submission_state(session, failed.id) == "training_error"
        message = get_submission_error_msg(session, failed.id)
        assert message.startswith("Traceback")
        assert "fails on purpose in fit()" in message
        assert "Training" not in message  # the log's lines before the traceback
        for team in ("alice", "bob"):
            sandbox = subs[(team, "starting_kit")]
            assert (sandbox.state, sandbox.queue_position, sandbox.max_ram) == ("new", -1, 0.0)
            assert not (Path(config.worker.predictions_dir) / sandbox.basename).exists()
        event = session.query(Event).filter_by(name=EVENT).one()
        for html in (event.public_leaderboard_html_with_links, event.private_leaderboard_html,
                     event.public_competition_leaderboard_html):
            assert "random_forest" in html
        assert "raising_error" in event.failed_leaderboard_html
        assert event.new_leaderboard_html is None  # get_leaderboard's answer: none waiting
        alice = next(t for t in event.event_teams if t.team.name == "alice")
        assert "random_forest" in alice.leaderboard_html
        assert "raising_error" in alice.failed_leaderboard_html


def test_idle_intake_is_one_read(dispatched):
    _, _, source, _ = dispatched
    counter = Counter(source.engine)
    with source.opened():
        source.intake()
    statements = [s.split()[0].upper() for s in counter.statements]
    assert statements.count("SELECT") == 2  # the event's existence, the waiting ones
    assert not {"UPDATE", "INSERT", "DELETE"} & set(statements)


def test_board_and_ledger_give_the_same_scores(dispatched, tmp_path, fake_conda_module):
    board, _, _, _ = dispatched
    folders = [folder for _, _, folder in SUBMISSIONS[:2]]
    config = load_event_config(make_event(tmp_path, folders,
                                          worker={"conda_env": "ramp-iris"}))
    Dispatcher(config).run()
    with Ledger(config.ledger_path) as ledger, board_session(board.database) as session:
        subs = _by_name(session, EVENT)
        for team, name, folder in SUBMISSIONS[:2]:
            bagged = get_bagged_scores(session, subs[(team, name)].id)
            last = bagged.index.get_level_values("n_bag").max()
            ledger_scores = ledger.get(folder).scores
            for step in ("valid", "test"):
                assert ledger_scores[step] == pytest.approx(
                    bagged.loc[(step, last)].to_dict(), rel=1e-12)


# -- what goes wrong -----------------------------------------------------------------------


def _state(board, key: int) -> str:
    with board_session(board.database) as session:
        return get_submission_state(session, key)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _ramp_test_of(name: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["status"] != psutil.STATUS_ZOMBIE and name in (
                process.info["cmdline"] or ()):
            found.append(process)
    return found


def test_sigkilled_dispatcher_restarted_leaves_nothing_stuck(sqlite_board):
    two = SUBMISSIONS[:2]
    event_config = add_board_event(sqlite_board, "iris_kill", submissions=two,
                                   dispatcher={"n_workers": 1})
    with board_session(sqlite_board.database) as session:
        keys = [k for k, _, _ in get_submissions(session, "iris_kill", None)
                if get_submission_by_id(session, k).is_not_sandbox]
    command = [sys.executable, "-m", "runner.cli", "dispatch", "--ramp-config",
               str(sqlite_board.ramp_config), "--event-config", str(event_config)]
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: [_state(sqlite_board, k) for k in keys] == ["scored", "training"],
                  120, "the first scored and the second training")
    finally:
        first.kill()
        first.wait()
    with board_session(sqlite_board.database) as session:
        scored_at = get_submission_by_id(session, keys[0]).training_timestamp
    assert _state(sqlite_board, keys[1]) == "training"  # what a dead dispatcher leaves

    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-2000:]
    names = [f"submission_{k:09d}" for k in keys]
    assert any("dead dispatcher" in line and names[1] in line
               for line in second.stderr.splitlines())  # recovered at start
    # The program prints each state change it records as "HH:MM:SS  name  state".
    assert f"{names[0]}  scored" not in second.stdout
    assert f"{names[1]}  scored" in second.stdout
    with board_session(sqlite_board.database) as session:
        assert [get_submission_state(session, k) for k in keys] == ["scored", "scored"]
        assert get_submission_by_id(session, keys[0]).training_timestamp == scored_at
    assert not _ramp_test_of(names[1])  # the killed run did not outlive its dispatcher


def test_postgres_outage_costs_a_retry(pg_board, postgres, caplog):
    two = SUBMISSIONS[:2]
    event_config = add_board_event(pg_board, "iris_outage", submissions=two,
                                   dispatcher={"n_workers": 1})
    config, source = load_ramp_event(pg_board.ramp_config, event_config)
    dispatcher = Dispatcher(config, source=source)
    failures: list[BaseException] = []

    def run() -> None:
        try:
            dispatcher.run()
        except BaseException as error:  # noqa: BLE001 (reported by the test)
            failures.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        _wait_for(lambda: any(status == "running" for _, status, _, _ in dispatcher.running()),
                  60, "a run")
        postgres.stop("fast")  # every connection dropped, as in a restart
        time.sleep(10)
        postgres.start()
        thread.join(180)
    finally:
        if thread.is_alive():
            dispatcher.stop()
            thread.join(60)
    assert not failures, failures
    assert "board unreachable" in caplog.text
    with board_session(pg_board.database) as session:
        states = [s.state for s in _by_name(session, "iris_outage").values()
                  if s.is_not_sandbox]
    assert states == ["scored", "scored"]


def test_organiser_stops_a_running_submission(sqlite_board):
    hanging = (("alice", "hangs", "hanging"),)
    event_config = add_board_event(sqlite_board, "iris_stop", submissions=hanging,
                                   worker={"timeout": 120},
                                   dispatcher={"time_between_collection": 1})
    config, source = load_ramp_event(sqlite_board.ramp_config, event_config)
    dispatcher = Dispatcher(config, source=source)
    thread = threading.Thread(target=dispatcher.run)
    thread.start()
    with board_session(sqlite_board.database) as session:
        key = _by_name(session, "iris_stop")[("alice", "hangs")].id
    name = f"submission_{key:09d}"
    try:
        _wait_for(lambda: _state(sqlite_board, key) == "training" and _ramp_test_of(name),
                  60, "the hanging submission to run")
        with board_session(sqlite_board.database) as session:  # as `ramp-database
            set_submission_state(session, key, "training_error")  # set-submission-state`
            set_submission_error_msg(session, key, "stopped by the organizers")
        changed = time.monotonic()
        _wait_for(lambda: not _ramp_test_of(name), 5, "the run to be killed")
        killed_after = time.monotonic() - changed
        thread.join(30)
    finally:
        if thread.is_alive():
            dispatcher.stop()
            thread.join(60)
    assert killed_after < 1 + 3  # time_between_collection, plus the kill itself
    with board_session(sqlite_board.database) as session:
        assert get_submission_state(session, key) == "training_error"
        assert get_submission_error_msg(session, key) == "stopped by the organizers"


def test_submission_refused_at_setup_is_a_training_error_on_the_board(sqlite_board):
    """A Dask run the worker refuses during setup (a link in the submission folder) fails
    from ``sent_to_training``: the board records it as the ledger would, at once."""
    refused = (("alice", "with_link", "random_forest"),)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster:
        event_config = add_board_event(
            sqlite_board, "iris_refused", submissions=refused,
            worker={"worker_type": "dask", "dask_scheduler": cluster.scheduler_address})
        config, source = load_ramp_event(sqlite_board.ramp_config, event_config)
        with board_session(sqlite_board.database) as session:
            key = _by_name(session, "iris_refused")[("alice", "with_link")].id
        folder = Path(config.worker.submissions_dir) / f"submission_{key:09d}"
        (folder / "shadow").symlink_to("/etc/shadow")
        dispatcher = Dispatcher(config, source=source)
        thread = threading.Thread(target=dispatcher.run)
        thread.start()
        thread.join(60)
        stuck = thread.is_alive()
        if stuck:
            dispatcher.stop()
            thread.join(60)
    with board_session(sqlite_board.database) as session:
        assert get_submission_state(session, key) == "training_error"
        assert "shadow is a symbolic link" in get_submission_error_msg(session, key)
    assert not stuck  # hunger_policy: exit, nothing left waiting


def test_public_error_never_shows_log_lines(tmp_path):
    log = tmp_path / "log"
    log.write_text("Testing Iris\nfold 0\n  test acc = 0.97\nsomething went wrong\n")
    assert public_error("  test acc = 0.97\nsomething went wrong", log) == NO_TRACEBACK_MESSAGE
    assert public_error("something went wrong", log) == NO_TRACEBACK_MESSAGE
    timeout = "Timeout: the submission ran longer than timeout=20 s and was killed."
    assert public_error(timeout, log) == timeout
    assert public_error("fold 0\nTraceback (most recent call last):\nValueError: x", log) == (
        "Traceback (most recent call last):\nValueError: x")


def test_public_error_shows_a_built_in_workers_message_as_it_is(tmp_path):
    """runner.results already kept only the run's error: its ending line vouches for it,
    even when the log holds the same words (a timeout's line is appended to the log)."""
    log = tmp_path / "log"
    ending = "ramp-runner: the run was stopped at its timeout (timeout=20 s)"
    log.write_text(f"fold 0\n  test acc = 0.97\n{ending}\n")
    assert public_error(ending, log) == ending
    raised = "Traceback (most recent call last):\nValueError: x\n" \
        "ramp-runner: the run exited with code 1"
    assert public_error(raised, log) == raised
