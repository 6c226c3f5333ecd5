"""The fair queue: round-robin across teams, on the ledger and through the dispatcher.

The property (``runner.fair_queue``): while a team waits, every other team starts at most
one run. It is checked on the ledger's own history over many seeded arrival patterns
(hypothesis is not in the lock), then through the real dispatcher: a real event with team
folders run by real ramp-test, and a quick worker for the caps and re-runs.
"""

from __future__ import annotations

import io
import random
import re
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from ramp_database.model import Event, EventTeam, Submission
from ramp_database.tools.submission import set_submission_state
from rich.console import Console

from runner.config import load_event_config
from runner.dispatcher import Dispatcher
from runner.display import status_table
from runner.errors import ConfigError
from runner.fair_queue import Waiting, fair_order, team_of
from runner.ledger import Ledger, Transition
from runner.ramp_server import load_ramp_event
from runner.worker import BaseWorker
from tests.events import EXAMPLE, make_event
from tests.rampboard import add_board_event, board_session, make_board, sqlite_database, submit


def unfair_waits(transitions: list[Transition]) -> list[str]:
    """Every time a team waited behind two runs of another team: for each claim of team X,
    from when that submission was X's next (its arrival, or X's previous claim) to its
    claim, the claims of each other team. Read from the ledger's history, in order."""
    arrived, last_claim, claims = {}, {}, []
    problems = []
    for index, t in enumerate(transitions):
        if t.from_state is None:
            arrived[t.name] = index
        elif t.to_state == "sent_to_training":
            claims.append((index, t.name))
    for index, name in claims:
        team = team_of(name)
        start = max(arrived[name], last_claim.get(team, -1))
        last_claim[team] = index
        others = Counter(team_of(n) for i, n in claims if start < i < index)
        problems += [f"{name} waited behind {count} runs of {other}"
                     for other, count in others.items() if other != team and count > 1]
    return problems


def test_fair_order_takes_turns_and_puts_runs_claimed_before_first():
    waiting = [Waiting("a1", "a"), Waiting("a2", "a"), Waiting("a3", "a"),
               Waiting("b1", "b"), Waiting("c1", "c"), Waiting("b2", "b", again=True)]
    assert [w.key for w in fair_order(waiting)] == ["b2", "a1", "c1", "b1", "a2", "a3"]
    # b was served last: a and c (never served) come before it.
    assert [w.key for w in fair_order(waiting[:5], {"b": 1})] == ["a1", "c1", "b1", "a2", "a3"]
    # A team at its cap is left out; limit bounds the answer.
    assert [w.key for w in fair_order(waiting[:5], running={"a": 1}, cap=1)] == ["b1", "c1"]
    assert [w.key for w in fair_order(waiting[:5], limit=2)] == ["a1", "b1"]


@pytest.mark.parametrize("seed", range(200))
def test_no_team_waits_behind_two_runs_of_another_on_the_ledger(tmp_path, seed):
    """Random arrivals (bursts of one team, a trickle of others, teams coming late) between
    claims of random sizes; the ledger's claims follow the order its queue_positions
    announced, and its history shows no team waiting behind two runs of another."""
    rng = random.Random(seed)
    teams = [f"t{i}" for i in range(rng.randint(2, 6))]
    with Ledger(tmp_path / "ledger.sqlite3") as ledger:
        count = 0
        for _ in range(rng.randint(5, 25)):
            if rng.random() < 0.6:
                team = rng.choice(teams)
                burst = rng.choice((1, 1, 2, 5, 12))
                names = [f"{team}/s{count + i}" for i in range(burst)]
                if rng.random() < 0.2:  # a submission with no team: its own
                    names = [f"solo{count}"]
                count += len(names)
                ledger.add(names)
            else:
                announced = sorted(ledger.queue_positions(), key=ledger.queue_positions().get)
                claimed = ledger.claim(rng.randint(1, 3), worker="d")
                assert claimed == announced[:len(claimed)]
        while ledger.claim(2, worker="d"):
            pass
        history = ledger.transitions()
    assert sum(t.to_state == "sent_to_training" for t in history) == count
    assert unfair_waits(history) == []


def test_first_in_first_out_would_fail_the_property():
    """The check can fail: the old order (oldest first) makes b wait behind a's burst."""
    history = [Transition(n, None, "new", "", 0) for n in ("a/1", "a/2", "a/3", "b/1")]
    history += [Transition(n, "new", "sent_to_training", "", 0)
                for n in ("a/1", "a/2", "a/3", "b/1")]
    assert unfair_waits(history) == ["b/1 waited behind 3 runs of a"]


def test_a_run_claimed_before_goes_first_and_caps_hold_on_the_ledger(tmp_path):
    with Ledger(tmp_path / "ledger.sqlite3") as ledger:
        ledger.add(["a/1", "a/2", "a/3", "b/1"])
        assert ledger.claim(2, worker="d", max_running_per_team=1) == ["a/1", "b/1"]
        assert ledger.claim(2, worker="d", max_running_per_team=1) == []  # a and b full
        ledger.mark_training("a/1")
        ledger.mark_training_error("a/1", "Traceback", 1.0, None)
        ledger.add(["c/1"])
        ledger.retry("b/1", "spot reclaimed", max_attempts=3)  # lost: back, and first
        assert ledger.queue_positions() == {"b/1": 1, "c/1": 2, "a/2": 3, "a/3": 4}
        ledger.rerun("a/1")  # the organiser's re-run: first too (oldest first among them)
        assert ledger.queue_positions() == {"a/1": 1, "b/1": 2, "c/1": 3, "a/2": 4,
                                            "a/3": 5}
        assert ledger.claim(5, worker="d") == ["a/1", "b/1", "c/1", "a/2", "a/3"]


def test_status_shows_each_waiting_submissions_place(tmp_path):
    with Ledger(tmp_path / "ledger.sqlite3") as ledger:
        ledger.add(["alice/a1", "alice/a2", "bob/b1", "carol"])
        ledger.claim(1, worker="d")
        table = status_table("event", ledger.all(), Counter(), ledger.queue_positions())
    console = Console(width=100, record=True, file=io.StringIO())
    console.print(table)
    text = console.export_text()
    # submission, state, queue (empty once claimed), runs
    for row in (r"alice/a1 +sent_to_training +0\b", r"bob/b1 +new +1 +0\b",
                r"carol +new +2 +0\b", r"alice/a2 +new +3 +0\b"):
        assert re.search(row, text), (row, text)
    assert "queue" in text


def test_a_ledger_of_before_team_folders_keeps_its_order(tmp_path):
    import sqlite3

    from runner.ledger import SCHEMA
    path = tmp_path / "old.sqlite3"
    old_schema = (SCHEMA.replace("    team TEXT NOT NULL DEFAULT '',\n", "")
                  .replace("    claimed_before INTEGER NOT NULL DEFAULT 0,\n", ""))
    old_schema = old_schema[:old_schema.index("CREATE TABLE IF NOT EXISTS teams")]
    with sqlite3.connect(path) as db:
        db.executescript(old_schema)
        db.executemany("INSERT INTO submissions (name, state, attempts, created_at, updated_at)"
                       " VALUES (?, ?, ?, ?, 0)", [("c", "new", 0, 1), ("a", "new", 0, 2),
                                                   ("b", "scored", 0, 0), ("d", "new", 1, 3)])
    with Ledger(path) as ledger:
        assert ledger.get("a").team == "a"
        assert ledger.claim(5, worker="d") == ["d", "c", "a"]  # a lost run first, then FIFO


def test_max_running_per_team_must_be_a_positive_integer(tmp_path):
    for value, expected in ((0, "an integer >= 1"), ("two", "integer")):
        path = make_event(tmp_path / str(value), (), dispatcher={"max_running_per_team": value})
        with pytest.raises(ConfigError, match="dispatcher.max_running_per_team") as error:
            load_event_config(path)
        assert expected in str(error.value) and str(path) in str(error.value)
    assert load_event_config(make_event(tmp_path / "none", ())).dispatcher \
        .max_running_per_team is None


# -- through the dispatcher ---------------------------------------------------------------

TEAM_EVENT = {"alice": ("random_forest", "starting_kit"), "bob": ("gradient_boosting",)}


def team_event(root: Path, layout: dict[str, tuple[str, ...]], flat=("starting_kit",),
               **sections) -> Path:
    """An event whose submissions sit in team folders (``layout``) and at the top (flat)."""
    path = make_event(root, flat, **sections)
    for team, names in layout.items():
        for name in names:
            shutil.copytree(EXAMPLE / "submissions" / name,
                            root / "submissions" / team / name,
                            ignore=shutil.ignore_patterns("training_output", "__pycache__"))
    return path


@pytest.fixture(scope="module")
def real_team_event(tmp_path_factory):
    """A real event with team folders, run by real ramp-test on one slot."""
    root = tmp_path_factory.mktemp("teams")
    config = load_event_config(team_event(root, TEAM_EVENT, dispatcher={"n_workers": 1}))
    Dispatcher(config).run()
    return config


def test_a_real_event_with_team_folders_runs_in_turns(real_team_event):
    config = real_team_event
    with Ledger(config.ledger_path) as ledger:
        states = {s.name: (s.state, s.team) for s in ledger.all()}
        claims = [t.name for t in ledger.transitions() if t.to_state == "sent_to_training"]
    assert states == {"starting_kit": ("scored", "starting_kit"),
                      "alice/random_forest": ("scored", "alice"),
                      "alice/starting_kit": ("scored", "alice"),
                      "bob/gradient_boosting": ("scored", "bob")}
    # Found in this order (the top level, then the team folders): alice's second waits
    # for bob's first.
    assert claims == ["starting_kit", "alice/random_forest", "bob/gradient_boosting",
                      "alice/starting_kit"]
    for name in states:
        assert (Path(config.worker.logs_dir) / name / "log").is_file()
        assert (Path(config.worker.predictions_dir) / name / "fold_0").is_dir()


class QuickWorker(BaseWorker):
    """Hands back a real run's output, its setup taking ``delay`` s; notes how many of each team's
    submissions it held at once (by the dispatcher's name, team/submission)."""

    output: Path | None = None
    delay = 0.3
    team_of_name = staticmethod(team_of)
    held: Counter[str] = Counter()
    most: Counter[str] = Counter()
    lock = threading.Lock()
    started: list[str] = []

    def _name(self) -> str:
        team = Path(self.config["submissions_dir"]).name
        return self.submission if team == "submissions" else f"{team}/{self.submission}"

    def setup(self):
        with self.lock:
            team = self.team_of_name(self._name())
            self.held[team] += 1
            self.most[team] = max(self.most[team], self.held[team])
            self.started.append(self._name())
        time.sleep(self.delay)
        super().setup()

    def _is_submission_finished(self):
        return True

    def collect_results(self):
        super().collect_results()
        with self.lock:
            self.held[self.team_of_name(self._name())] -= 1
        shutil.copytree(self.output, Path(self.config["predictions_dir"]) / self.submission)
        self.status = "collected"
        return 0, ""


@pytest.fixture
def quick_event(tmp_path, monkeypatch, real_team_event):
    """Make an event of empty submission folders in team folders, run by QuickWorker."""
    monkeypatch.setattr("runner.dispatcher.worker_class", lambda worker_type: QuickWorker)
    monkeypatch.setattr(QuickWorker, "output",
                        Path(real_team_event.worker.predictions_dir) / "starting_kit")
    monkeypatch.setattr(QuickWorker, "held", Counter())
    monkeypatch.setattr(QuickWorker, "most", Counter())
    monkeypatch.setattr(QuickWorker, "started", [])

    def make(names, root=tmp_path, **dispatcher):
        config = load_event_config(make_event(root, (), dispatcher=dispatcher))
        for name in names:
            (Path(config.worker.submissions_dir) / name).mkdir(parents=True)
        return config
    return make


@pytest.mark.parametrize("cap", [1, 2])
def test_max_running_per_team_holds_through_the_dispatcher(quick_event, cap):
    config = quick_event([*(f"alice/a{i}" for i in range(6)), "bob/b0", "bob/b1"],
                         n_workers=4, max_running_per_team=cap, hunger_policy="exit")
    Dispatcher(config).run()
    assert QuickWorker.most == {"alice": cap, "bob": min(cap, 2)}
    with Ledger(config.ledger_path) as ledger:
        assert {s.state for s in ledger.all()} == {"scored"}


def test_arrivals_while_dispatching_keep_the_property(quick_event):
    """Bursts and trickles dropped into a running dispatcher (two slots), as organisers'
    folders arrive: the history shows no team waiting behind two runs of another."""
    rng = random.Random(7)
    config = quick_event(["alice/a0"], n_workers=2)
    dispatcher = Dispatcher(config)
    thread = threading.Thread(target=dispatcher.run)
    thread.start()
    submissions = Path(config.worker.submissions_dir)
    total = 1
    try:
        for step in range(12):
            team = rng.choice(("alice", "alice", "bob", "carol", "dave"))
            for i in range(rng.choice((1, 1, 4))):
                staging = submissions / team / f".s{step}_{i}.incoming"
                staging.mkdir(parents=True)
                staging.rename(submissions / team / f"s{step}_{i}")
                total += 1
            time.sleep(rng.uniform(0.05, 0.5))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with Ledger(config.ledger_path) as ledger:
                if sum(s.state == "scored" for s in ledger.all()) == total:
                    break
            time.sleep(0.2)
    finally:
        dispatcher.stop()
        thread.join(60)
    with Ledger(config.ledger_path) as ledger:
        assert sum(s.state == "scored" for s in ledger.all()) == total
        assert unfair_waits(ledger.transitions()) == []


def scored(ledger: Ledger) -> set[str]:
    """The names of the ledger's scored submissions."""
    return {s.name for s in ledger.all() if s.state == "scored"}


def test_a_rerun_goes_first_through_the_dispatcher(quick_event):
    """Asked while alice's older submissions wait (first in, first out would run them
    first), the re-run is the next to start."""
    config = quick_event([*(f"alice/a{i}" for i in range(5)), "bob/b0"], n_workers=1)
    dispatcher = Dispatcher(config)
    thread = threading.Thread(target=dispatcher.run)
    thread.start()
    try:
        with Ledger(config.ledger_path) as organiser:
            deadline = time.monotonic() + 30
            while "bob/b0" not in scored(organiser) and time.monotonic() < deadline:
                time.sleep(0.02)
            organiser.rerun("bob/b0")
            while len(scored(organiser)) < 6 and time.monotonic() < deadline:
                time.sleep(0.1)
            history = organiser.transitions()
            waiting_older = organiser.get("alice/a4").created_at < organiser.get(
                "bob/b0").created_at
    finally:
        dispatcher.stop()
        thread.join(60)
    rerun = next(i for i, t in enumerate(history) if t.detail == "rerun asked")
    claims_after = [t.name for t in history[rerun:] if t.to_state == "sent_to_training"]
    assert waiting_older and claims_after[0] == "bob/b0"
    assert "alice/a4" in claims_after  # an older one was still waiting


# -- on a RAMP board (ramp-database on SQLite and PostgreSQL) ----------------------------

BOARD_SUBMISSIONS = (("alice", "a1", "random_forest"), ("alice", "a2", "gradient_boosting"),
                     ("alice", "a3", "raising_error"), ("bob", "b1", "random_forest"))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def board(request, tmp_path_factory, fake_conda_module):
    root = tmp_path_factory.mktemp(f"{request.param}-board")
    if request.param == "sqlite":
        return make_board(root, sqlite_database(root))
    return make_board(root, request.getfixturevalue("postgres").database)


def _board_queue(board, event: str) -> dict[str, tuple[str, int]]:
    """{submission name: (state, queue_position)} of the event's participants' submissions."""
    with board_session(board.database) as session:
        return {s.name: (s.state, s.queue_position) for s in session.query(Submission)
                .join(EventTeam).join(Event).filter(Event.name == event) if s.is_not_sandbox}


def _claim_order(board, event: str) -> list[str]:
    with board_session(board.database) as session:
        rows = (session.query(Submission).join(EventTeam).join(Event)
                .filter(Event.name == event, Submission.sent_to_training_timestamp.isnot(None))
                .order_by(Submission.sent_to_training_timestamp))
        return [s.name for s in rows]


def test_a_board_keeps_the_fair_order_and_its_queue_positions(board, quick_event):
    """alice uploads three, then bob one: bob's starts second, and the board's
    queue_position said so before anything ran; a re-run asked on the board then goes
    before a newer upload."""
    event_config = add_board_event(board, "iris_fair", submissions=BOARD_SUBMISSIONS,
                                   dispatcher={"n_workers": 1})
    config, source = load_ramp_event(board.ramp_config, event_config)
    with source.opened():
        source.intake()
    assert _board_queue(board, "iris_fair") == {
        "a1": ("new", 1), "b1": ("new", 2), "a2": ("new", 3), "a3": ("new", 4)}
    Dispatcher(config, source=source).run()
    assert _claim_order(board, "iris_fair") == ["a1", "b1", "a2", "a3"]
    assert {state for state, _ in _board_queue(board, "iris_fair").values()} == {"scored"}

    submit(board, "iris_fair", (("bob", "b2", "gradient_boosting"),))
    with board_session(board.database) as session:  # the organiser re-runs alice's a2
        key = next(s.id for s in session.query(Submission).filter_by(name="a2"))
        set_submission_state(session, key, "new")
    config, source = load_ramp_event(board.ramp_config, event_config)
    with source.opened():
        source.intake()
    assert _board_queue(board, "iris_fair")["a2"] == ("new", 1)
    assert _board_queue(board, "iris_fair")["b2"] == ("new", 2)
    Dispatcher(config, source=source).run()
    assert _claim_order(board, "iris_fair")[-2:] == ["a2", "b2"]


def test_a_board_holds_max_running_per_team(board, quick_event, monkeypatch):
    event_config = add_board_event(board, "iris_cap", submissions=BOARD_SUBMISSIONS,
                                   dispatcher={"n_workers": 3, "max_running_per_team": 2})
    with board_session(board.database) as session:
        teams = {f"submission_{s.id:09d}": s.team.name for s in session.query(Submission)
                 .join(EventTeam).join(Event).filter(Event.name == "iris_cap")}
    monkeypatch.setattr(QuickWorker, "team_of_name", staticmethod(teams.get))
    config, source = load_ramp_event(board.ramp_config, event_config)
    Dispatcher(config, source=source).run()
    # Three slots, but alice's three never ran three at once.
    assert QuickWorker.most == {"alice": 2, "bob": 1}
    assert {state for state, _ in _board_queue(board, "iris_cap").values()} == {"scored"}
