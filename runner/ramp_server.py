"""On a RAMP server: read ramp-engine's two config files, and serve every open event.

``load_ramp_event`` takes what ``ramp-launch dispatcher --config --event-config`` takes;
``serve`` replaces ``ramp-launch daemon --config --events-dir``: one dispatcher process per
open event, started when the event opens, stopped when it closes, restarted when it dies.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ramp_database.model import Event
from ramp_utils import generate_ramp_config, read_config
from sqlalchemy.orm import Session

from runner.config import PATH_KEYS, EventConfig, parse_event_config
from runner.errors import ConfigError
from runner.rampdb import RampSource, board_engine
from runner.signals import stop_on_signals

logger = logging.getLogger("runner.ramp_server")

# ramp-launch's defaults when the event config's dispatcher section is silent (cli.py).
RAMP_DISPATCHER_DEFAULTS = {"hunger_policy": "sleep", "n_workers": -1}
# generate_ramp_config's names for the paths of the ``ramp`` section, by worker key.
RAMP_PATH_KEYS = {"kit_dir": "ramp_kit_dir", "data_dir": "ramp_data_dir",
                  "submissions_dir": "ramp_submissions_dir",
                  "predictions_dir": "ramp_predictions_dir", "logs_dir": "ramp_logs_dir"}
SERVE_POLL_SECONDS = 10.0
# A dispatcher that keeps dying is restarted after 1, 2, 4... s, at most this often.
MAX_RESTART_PAUSE = 60.0
DISPATCHER_LOG = "dispatcher.log"


def read_database_config(ramp_config_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``sqlalchemy:`` section of RAMP's database config, read as ramp-utils reads it."""
    try:
        return read_config(str(ramp_config_path), filter_section="sqlalchemy")
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise ConfigError(str(ramp_config_path), "sqlalchemy",
                          "a section with drivername, username, password, host, port, "
                          "database", str(error).splitlines()[0]) from None


def load_ramp_config(ramp_config_path: str | os.PathLike[str],
                     event_config_path: str | os.PathLike[str]) -> EventConfig:
    """An event config written for ramp-engine, with RAMP's defaults where it is silent.

    Paths the event config does not give are RAMP's (``ramp_utils.generate_ramp_config``:
    under the database config's folder, ``ramp-kits/<problem>``, ``ramp-data/<problem>``,
    ``events/<event>/{submissions,predictions,logs}``); ``hunger_policy`` defaults to
    ``sleep`` and ``n_workers`` to -1 as in ``ramp-launch``.
    """
    path = Path(event_config_path).expanduser().resolve()
    try:
        document = yaml.safe_load(path.read_text())
        ramp_paths = generate_ramp_config(str(path), str(Path(ramp_config_path).resolve()))
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(str(path), "<file>", "a readable YAML file", str(error)) from None
    except (ValueError, KeyError) as error:
        raise ConfigError(str(path), "ramp", "problem_name, event_name, event_title and "
                          "event_is_public", str(error).splitlines()[0]) from None
    if not isinstance(document, Mapping) or not isinstance(document.get("ramp"), Mapping):
        raise ConfigError(str(path), "ramp", "a mapping of keys to values")
    ramp = dict(document["ramp"])
    # RAMP names the sandbox's folder ``sandbox_dir``.
    if "sandbox_dir" in ramp:
        ramp.setdefault("sandbox_name", ramp.pop("sandbox_dir"))
    worker = dict(document.get("worker") or {})
    for key in PATH_KEYS:
        if not worker.get(key) and not ramp.get(key):
            worker[key] = ramp_paths[RAMP_PATH_KEYS[key]]
    dispatcher = {**RAMP_DISPATCHER_DEFAULTS, **(document.get("dispatcher") or {})}
    return parse_event_config({**document, "ramp": ramp, "worker": worker,
                               "dispatcher": dispatcher}, path)


def load_ramp_event(ramp_config_path: str | os.PathLike[str],
                    event_config_path: str | os.PathLike[str]) -> tuple[EventConfig, RampSource]:
    """The event config and the board source ``Dispatcher(config, source=source)`` takes,
    from the two files ``ramp-launch dispatcher`` takes."""
    database = read_database_config(ramp_config_path)
    config = load_ramp_config(ramp_config_path, event_config_path)
    return config, RampSource(config, database)


# -- serve ------------------------------------------------------------------------------


@dataclass
class _Child:
    """One event's dispatcher process."""

    event: str
    process: subprocess.Popen | None = None
    failures: int = 0
    restart_at: float = 0.0
    unserved: bool = False
    log: Any = field(default=None, repr=False)


def open_events(database: Mapping[str, Any]) -> list[str]:
    """Names of the board's events open now (``Event.is_open``), as ramp-engine's daemon
    reads them."""
    engine = board_engine(database)
    try:
        with Session(engine) as session:
            return sorted(e.name for e in session.query(Event).all() if e.is_open)
    finally:
        engine.dispose()


def serve(ramp_config_path: str | os.PathLike[str], events_dir: str | os.PathLike[str],
          on_status: Callable[[str, str], None] | None = None,
          stop: threading.Event | None = None,
          poll_seconds: float = SERVE_POLL_SECONDS) -> None:
    """Keep one dispatcher process per open event of the board (``ramp-launch daemon``).

    Every ``poll_seconds`` the board's open events are read again: an event opened later
    gets its dispatcher, a closed one has its dispatcher stopped (SIGTERM: its running
    submissions go back to ``new``), a dispatcher that died is restarted (after 1, 2, 4...
    s while it keeps dying). Each writes to ``events/<event>/dispatcher.log``.
    ``on_status(event, line)`` hears every change. Returns when ``stop`` is set or on
    SIGINT/SIGTERM, after stopping every dispatcher.
    """
    ramp_config_path = Path(ramp_config_path).resolve()
    events_dir = Path(events_dir).resolve()
    if not events_dir.is_dir():
        raise ConfigError(str(events_dir), "--events-dir", "an existing folder")
    database = read_database_config(ramp_config_path)
    report = on_status or (lambda event, line: logger.info("%s: %s", event, line))
    stop = stop or threading.Event()
    children: dict[str, _Child] = {}
    with stop_on_signals(stop.set):
        try:
            while not stop.is_set():
                _serve_once(ramp_config_path, events_dir, database, children, report)
                stop.wait(poll_seconds)
        finally:
            for child in children.values():
                _stop_child(child, report, "stopped: serve is shutting down")


def _serve_once(ramp_config: Path, events_dir: Path, database: Mapping[str, Any],
                children: dict[str, _Child], report: Callable[[str, str], None]) -> None:
    try:
        opened = set(open_events(database))
    except Exception as error:  # the board is away: keep what runs, look again later
        logger.warning("cannot read the board's events: %s", error)
        return
    for name in sorted(set(children) - opened):
        _stop_child(children.pop(name), report, "stopped: the event is closed")
    for name in sorted(opened):
        child = children.setdefault(name, _Child(name))
        if child.process is not None:
            code = child.process.poll()
            if code is None:
                continue
            child.failures = child.failures + 1 if code else 0
            # A clean exit (hunger_policy: exit) starts again at once; a crash waits.
            pause = min(2.0 ** (child.failures - 1), MAX_RESTART_PAUSE) if code else 0.0
            child.restart_at = time.monotonic() + pause
            child.process = None
            report(name, f"dispatcher ended with {_exit_text(code)}")
        if time.monotonic() < child.restart_at:
            continue
        event_config = events_dir / name / "config.yml"
        if not event_config.is_file():
            if not child.unserved:
                report(name, f"open, not served: no {event_config}")
            child.unserved = True
            continue
        child.unserved = False
        _start_child(child, ramp_config, event_config, report)


def _start_child(child: _Child, ramp_config: Path, event_config: Path,
                 report: Callable[[str, str], None]) -> None:
    if child.log is not None:
        child.log.close()
    child.log = open(event_config.parent / DISPATCHER_LOG, "ab")
    child.process = subprocess.Popen(
        [sys.executable, "-m", "runner.cli", "dispatch", "--ramp-config",
         str(ramp_config), "--event-config", str(event_config)],
        stdout=child.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    report(child.event, f"dispatcher running (pid {child.process.pid}), "
                        f"log {event_config.parent / DISPATCHER_LOG}")


def _stop_child(child: _Child, report: Callable[[str, str], None], why: str) -> None:
    process = child.process
    if process is not None and process.poll() is None:
        process.terminate()  # the dispatcher puts its running submissions back to new
        try:
            process.wait(timeout=150)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        report(child.event, why)
    if child.log is not None:
        child.log.close()


def _exit_text(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit status {code}"
