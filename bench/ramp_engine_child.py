"""ramp-engine 0.10.1's side of bench/dispatch.py; runs inside bench/.venvs/ramp-engine.

It imports only what that environment holds (ramp-engine, ramp-database, ramp-utils), never
``runner``:

    python ramp_engine_child.py build ROOT SOURCES   # RAMP database, ramp-database's own way
    python ramp_engine_child.py run ROOT SLOTS       # ramp-engine's Dispatcher + CondaEnvWorker

``ROOT`` holds ``ramp-kits/iris`` and ``ramp-data/iris`` (data prepared); ``SOURCES`` is a
folder of submission folders, added in name order. ``run`` writes ``ROOT/states.json``:
per submission, the wall-clock time (``time.time()``) each state was committed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import yaml

EVENT = "iris_bench"


def sqlalchemy(root: Path) -> dict:
    """The database section; ramp-utils wants the network keys even for SQLite."""
    return {"drivername": "sqlite", "database": str(root / "ramp.sqlite3"), "host": None,
            "port": None, "username": None, "password": None}
TEAM = "bench"


def paths(root: Path) -> tuple[str, str]:
    """The database config and the event config, laid out as ``ramp-utils`` expects."""
    return str(root / "config.yml"), str(root / "events" / EVENT / "config.yml")


def build(root: Path, sources: Path) -> None:
    """Create the SQLite database: problem, event, one admin user and team, the submissions."""
    from ramp_database.testing import setup_files_extension_type
    from ramp_database.tools.event import add_event, add_problem
    from ramp_database.tools.submission import add_submission
    from ramp_database.tools.team import sign_up_team
    from ramp_database.tools.user import add_user
    from ramp_database.utils import session_scope
    from ramp_utils import generate_ramp_config

    database, event = paths(root)
    Path(database).write_text(yaml.safe_dump({"sqlalchemy": sqlalchemy(root)}))
    Path(event).parent.mkdir(parents=True, exist_ok=True)
    Path(event).write_text(yaml.safe_dump({
        "ramp": {"problem_name": "iris", "event_name": EVENT, "event_title": "bench",
                 "event_is_public": True},
        "worker": {"worker_type": "conda", "conda_env": "base", "timeout": 120},
    }))
    ramp = generate_ramp_config(event, database)
    Path(ramp["ramp_submissions_dir"]).mkdir(parents=True, exist_ok=True)
    with session_scope(sqlalchemy(root)) as session:
        setup_files_extension_type(session)
        # An admin is not held back by min_duration_between_submissions.
        add_user(session, name=TEAM, password="bench", lastname="Bench", firstname="Bench",
                 email="bench@example.org", access_level="admin")
        add_problem(session, "iris", ramp["ramp_kit_dir"], ramp["ramp_data_dir"])
        add_event(session, "iris", EVENT, "bench", ramp["sandbox_name"],
                  ramp["ramp_submissions_dir"], is_public=True)
        sign_up_team(session, EVENT, TEAM)
        for source in sorted(sources.iterdir()):
            add_submission(session, EVENT, TEAM, source.name, str(source))


def run(root: Path, slots: int) -> None:
    """Run ramp-engine's dispatcher until its queue is empty; record every state change."""
    import ramp_engine.dispatcher as engine
    from ramp_database.tools.submission import (
        get_submission_by_id,
        get_submission_state,
        get_submissions,
    )
    from ramp_database.utils import session_scope

    states: dict[int, dict[str, float]] = {}
    record = engine.set_submission_state

    def recorded(session, submission_id, state):
        record(session, submission_id, state)  # commits
        states.setdefault(submission_id, {})[state] = time.time()

    engine.set_submission_state = recorded
    database, event = paths(root)
    engine.Dispatcher(database, event, n_workers=slots, n_threads=1, hunger_policy="exit",
                      time_between_collection=1).launch()
    with session_scope(sqlalchemy(root)) as s:
        rows = {basename: {"name": get_submission_by_id(s, i).name,
                           "final": get_submission_state(s, i), "at": states.get(i, {})}
                for i, basename, _ in get_submissions(s, EVENT, None)}
    (root / "states.json").write_text(json.dumps(rows))


if __name__ == "__main__":
    command, root = sys.argv[1], Path(sys.argv[2])
    if command == "build":
        build(root, Path(sys.argv[3]))
    else:
        run(root, int(sys.argv[3]))
