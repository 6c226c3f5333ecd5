"""ramp-engine's two config files read with RAMP's defaults, and ``serve`` over a real board."""

from __future__ import annotations

import datetime
import os
import signal
import threading
import time

import pytest
import yaml
from ramp_database.model import Event
from ramp_database.tools.submission import get_submission_state

from runner.errors import ConfigError
from runner.ramp_server import load_ramp_config, load_ramp_event, serve
from tests.rampboard import add_board_event, board_session, make_board, sqlite_database

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def board(tmp_path_factory, fake_conda_module):
    root = tmp_path_factory.mktemp("serve-board")
    return make_board(root, sqlite_database(root))


def test_ramp_defaults_fill_what_the_event_config_leaves_out(tmp_path):
    (tmp_path / "config.yml").write_text(yaml.safe_dump({"sqlalchemy": sqlite_database(tmp_path)}))
    event_config = tmp_path / "events" / "iris_x" / "config.yml"
    event_config.parent.mkdir(parents=True)
    event_config.write_text(yaml.safe_dump({
        "ramp": {"problem_name": "iris", "event_name": "iris_x", "event_title": "x",
                 "event_is_public": True, "sandbox_dir": "my_kit"},
        "worker": {"worker_type": "conda", "conda_env": "ramp-iris"}}))
    config = load_ramp_config(tmp_path / "config.yml", event_config)
    worker = config.worker
    assert worker.kit_dir == str(tmp_path / "ramp-kits" / "iris")
    assert worker.data_dir == str(tmp_path / "ramp-data" / "iris")
    for key in ("submissions", "predictions", "logs"):
        assert getattr(worker, f"{key}_dir") == str(tmp_path / "events" / "iris_x" / key)
    assert (config.dispatcher.hunger_policy, config.dispatcher.n_workers) == ("sleep", -1)
    assert config.ramp.sandbox_name == "my_kit"


def test_event_config_paths_and_dispatcher_keys_win(tmp_path):
    (tmp_path / "config.yml").write_text(yaml.safe_dump({"sqlalchemy": sqlite_database(tmp_path)}))
    event_config = tmp_path / "config.yml.event"
    event_config.write_text(yaml.safe_dump({
        "ramp": {"problem_name": "iris", "event_name": "iris_x", "event_title": "x",
                 "event_is_public": True, "kit_dir": "/srv/kit"},
        "worker": {"worker_type": "conda", "logs_dir": "/srv/logs"},
        "dispatcher": {"hunger_policy": "exit", "n_workers": 2}}))
    config = load_ramp_config(tmp_path / "config.yml", event_config)
    assert (config.worker.kit_dir, config.worker.logs_dir) == ("/srv/kit", "/srv/logs")
    assert (config.dispatcher.hunger_policy, config.dispatcher.n_workers) == ("exit", 2)


def test_a_database_config_without_sqlalchemy_is_one_clear_line(tmp_path):
    (tmp_path / "config.yml").write_text("flask: {}\n")
    with pytest.raises(ConfigError, match=r"config\.yml: sqlalchemy: expected a section"):
        load_ramp_event(tmp_path / "config.yml", tmp_path / "whatever.yml")


def _set_open(board, event: str, is_open: bool) -> None:
    with board_session(board.database) as session:
        row = session.query(Event).filter_by(name=event).one()
        now = datetime.datetime.utcnow()
        row.closing_timestamp = now + datetime.timedelta(days=1 if is_open else -1)


def test_serve_follows_the_board(board):
    first = add_board_event(board, "iris_first", submissions=(),
                            dispatcher={"hunger_policy": "sleep"})
    assert first.is_file()
    lines: list[tuple[str, str]] = []
    stop = threading.Event()
    thread = threading.Thread(target=serve, kwargs=dict(
        ramp_config_path=board.ramp_config, events_dir=board.root / "events",
        on_status=lambda event, line: lines.append((event, line)), stop=stop,
        poll_seconds=0.5))
    thread.start()

    def wait_line(event: str, text: str, after: int = 0) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for index, (name, line) in enumerate(lines[after:], start=after):
                if name == event and text in line:
                    return index
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} for {event} in {lines}")

    try:
        start = wait_line("iris_first", "dispatcher running")
        pid = int(lines[start][1].split("pid ")[1].split(")")[0])
        # An event opened after serve started, with a submission: served, and scored.
        late = (("alice", "random_forest", "random_forest"),)
        add_board_event(board, "iris_late", submissions=late,
                        dispatcher={"hunger_policy": "sleep", "n_workers": 1})
        wait_line("iris_late", "dispatcher running")
        with board_session(board.database) as session:
            key = next(s.id for s in session.query(Event).filter_by(name="iris_late").one()
                       .event_teams[0].submissions if s.is_not_sandbox)

        def late_state() -> str:
            with board_session(board.database) as session:
                return get_submission_state(session, key)
        deadline = time.monotonic() + 90
        while late_state() != "scored" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert late_state() == "scored"
        # A killed dispatcher is restarted.
        os.kill(pid, signal.SIGKILL)
        ended = wait_line("iris_first", "ended with signal SIGKILL", start)
        again = wait_line("iris_first", "dispatcher running", ended)
        assert f"pid {pid})" not in lines[again][1]
        # A closed event's dispatcher is stopped.
        _set_open(board, "iris_late", False)
        wait_line("iris_late", "stopped: the event is closed")
    finally:
        stop.set()
        thread.join(120)
    assert not thread.is_alive()
    # The dispatchers' output is kept where an organiser reads it.
    # The dispatcher prints each state change it records as "HH:MM:SS  name  state".
    assert "  scored\n" in (board.event_dir("iris_late") / "dispatcher.log").read_text()
