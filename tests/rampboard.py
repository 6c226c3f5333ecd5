"""Build a RAMP board deployment from the example iris event, as the website populates it.

The layout is ramp-utils' (``ramp-setup init``): the database config ``config.yml`` at the
root, ``ramp-kits/iris``, ``ramp-data/iris`` and ``events/<event>/config.yml`` beside it.
The database is filled with ramp-database's own functions (``create_toy_db`` needs the
network and a file the wheel lacks): a problem, an event, users whose sign-up adds the
event's sandbox submission, and the example submissions added as participants add them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from ramp_database.model import Event, Model
from ramp_database.testing import setup_files_extension_type
from ramp_database.tools.event import add_event, add_problem
from ramp_database.tools.submission import add_submission
from ramp_database.tools.team import sign_up_team
from ramp_database.tools.user import add_user, approve_user
from sqlalchemy.orm import Session

from runner.rampdb import board_engine
from tests.events import EXAMPLE

PROBLEM = "iris"
EVENT = "iris_board"
# (team, submission name, example folder): two teams share the name "random_forest".
SUBMISSIONS = (
    ("alice", "random_forest", "random_forest"),
    ("bob", "random_forest", "gradient_boosting"),
    ("alice", "raising_error", "raising_error"),
)


@dataclass(frozen=True)
class Board:
    """A RAMP deployment on disk and its database."""

    root: Path
    ramp_config: Path       # the database config (``sqlalchemy:`` section)
    database: dict          # that section, as ramp-database's session_scope takes it

    def event_dir(self, event: str = EVENT) -> Path:
        """``events/<event>``: its config.yml, and RAMP's default run folders."""
        return self.root / "events" / event

    def event_config(self, event: str = EVENT) -> Path:
        """The event's config.yml."""
        return self.event_dir(event) / "config.yml"


@contextmanager
def board_session(database: dict) -> Iterator[Session]:
    """A session on the board, committed at the end (ramp-database's ``session_scope``,
    over the engine ramp-runner uses: it picks psycopg2 for ``postgresql``)."""
    engine = board_engine(database)
    try:
        with Session(engine) as session:
            yield session
            session.commit()
    finally:
        engine.dispose()


def sqlite_database(root: Path) -> dict:
    """A ``sqlalchemy:`` section for an SQLite file (read_config wants every key)."""
    return {"drivername": "sqlite", "username": None, "password": None, "host": None,
            "port": None, "database": str(root / "ramp.sqlite3")}


def make_board(root: Path, database: dict) -> Board:
    """Lay out a deployment under ``root``; create the schema, the iris problem and users."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(EXAMPLE / "ramp-kits", root / "ramp-kits",
                    ignore=shutil.ignore_patterns("training_output", "__pycache__"))
    data = root / "ramp-data" / PROBLEM
    data.mkdir(parents=True)
    shutil.copy(EXAMPLE / "ramp-data" / PROBLEM / "prepare_data.py", data)
    # add_event computes the CV folds from the training data: prepare it first, as
    # ramp-setup deploy-event does.
    subprocess.run([sys.executable, "prepare_data.py"], cwd=data, check=True,
                   capture_output=True)
    ramp_config = root / "config.yml"
    ramp_config.write_text(yaml.safe_dump({"sqlalchemy": database}))
    engine = board_engine(database)
    Model.metadata.drop_all(engine)
    Model.metadata.create_all(engine)
    engine.dispose()
    with board_session(database) as session:
        setup_files_extension_type(session)
        add_problem(session, PROBLEM, str(root / "ramp-kits" / PROBLEM), str(data))
        for user in ("alice", "bob"):
            add_user(session, name=user, password="secret", lastname=user,
                     firstname=user, email=f"{user}@example.org", access_level="user")
            approve_user(session, user)
    return Board(root=root, ramp_config=ramp_config, database=database)


def add_board_event(board: Board, event: str = EVENT, worker: dict | None = None,
                    dispatcher: dict | None = None, submissions=SUBMISSIONS) -> Path:
    """Write ``events/<event>/config.yml`` as ramp-engine reads it and add the event, its
    teams (whose sign-up adds the sandbox) and ``submissions``; return the config path."""
    event_dir = board.event_dir(event)
    event_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "ramp": {"problem_name": PROBLEM, "event_name": event,
                 "event_title": f"{event} (test)", "event_is_public": True},
        "worker": {"worker_type": "conda", "conda_env": "ramp-iris", "timeout": 20,
                   **(worker or {})},
        "dispatcher": {"n_workers": 2, "n_threads": 1, "hunger_policy": "exit",
                       **(dispatcher or {})},
    }
    board.event_config(event).write_text(yaml.safe_dump(config))
    with board_session(board.database) as session:
        add_event(session, PROBLEM, event, config["ramp"]["event_title"], "starting_kit",
                  str(event_dir / "submissions"), is_public=True)
        for team in ("alice", "bob"):
            sign_up_team(session, event, team)
    submit(board, event, submissions)
    return board.event_config(event)


def submit(board: Board, event: str, submissions=SUBMISSIONS) -> None:
    """Add submissions as the website does on a participant's upload."""
    with board_session(board.database) as session:
        event_row = session.query(Event).filter_by(name=event).one()
        # The website refuses a second upload within min_duration_between_submissions.
        event_row.min_duration_between_submissions = 0
        session.commit()
        for team, name, folder in submissions:
            add_submission(session, event, team, name, str(EXAMPLE / "submissions" / folder))
