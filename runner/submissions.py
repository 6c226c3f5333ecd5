"""The event's submission folders: finding them and adding new ones."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from runner.config import EventConfig
from runner.ledger import Ledger

# A name ramp-test and every filesystem accept, and that cannot climb out of the folder.
VALID_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def discover(submissions_dir: str | Path) -> list[str]:
    """Names of the submission folders in ``submissions_dir`` (hidden ones skipped)."""
    folder = Path(submissions_dir)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def submit(config: EventConfig, source: str | Path, name: str | None = None) -> str:
    """Copy the submission folder ``source`` into the event as ``name`` and queue it."""
    source = Path(source)
    name = name or source.name
    if not source.is_dir():
        raise ValueError(f"{source}: expected a submission folder")
    if not VALID_NAME.match(name):
        raise ValueError(f"submission name {name!r}: expected letters, digits, '_', '-' or '.'")
    target = Path(config.worker.submissions_dir) / name
    if target.exists():
        raise ValueError(f"a submission called {name!r} already exists in {target.parent}")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Copy under a hidden name first: the dispatcher skips hidden folders, so it never
    # picks up a half-copied submission.
    staging = target.with_name(f".{name}.incoming")
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("training_output"))
    staging.rename(target)
    with Ledger(config.ledger_path) as ledger:
        ledger.add([name])
    return name
