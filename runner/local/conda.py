"""Conda environments on this machine: where an environment lives, how to make one.

Shared by every run on the machine that executes it: the conda worker here, and the task
a Dask worker runs (a Dask run is a local run on that worker's machine).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from runner.errors import EventError

logger = logging.getLogger("runner.worker")


class CondaError(EventError):
    """A conda environment that cannot be found or used."""


def conda_executable() -> str | None:
    """The conda to ask: ``$CONDA_EXE`` when set, else ``conda`` on PATH, else None."""
    return os.environ.get("CONDA_EXE") or shutil.which("conda")


def conda_env_prefix(name: str | None) -> Path:
    """Return the prefix of conda environment ``name`` (None: the base environment).

    With no conda installed and no name asked for, the Python environment running this
    code stands in for the base environment.
    """
    conda = conda_executable()
    if conda is None:
        if name is not None:
            raise CondaError(f"conda_env {name!r} asked for, but no conda was found "
                             "(set CONDA_EXE or put conda on PATH)")
        logger.debug("no conda found: submissions run in this Python environment (%s)",
                    sys.prefix)
        return Path(sys.prefix)
    completed = subprocess.run([conda, "info", "--envs", "--json"], capture_output=True,
                               text=True, check=False)
    if completed.returncode != 0:
        raise CondaError(f"'{conda} info --envs --json' failed: {completed.stderr.strip()}")
    try:
        info = json.loads(completed.stdout)
        prefixes = [Path(p) for p in info["envs"]]
        root = Path(info.get("root_prefix") or info.get("conda_prefix") or prefixes[0])
    except (ValueError, KeyError, IndexError, TypeError):
        raise CondaError(f"'{conda} info --envs --json' gave no list of environments") from None
    if name is None or name == "base":
        return root
    for prefix in prefixes:
        if prefix.name == name and prefix != root:
            return prefix
    known = ", ".join(sorted({"base", *(p.name for p in prefixes if p != root)}))
    raise CondaError(f"unknown conda environment {name!r}; known: {known}")


def environment_command(action: str, conda_env: str | None, kit_dir: str | Path) -> list[str]:
    """The argv of ``conda env create|update -n ENV -f KIT/environment.yml``.

    This is RAMP's ``ramp setup create-conda-env`` / ``update-conda-env``.
    """
    if action not in ("create", "update"):
        raise ValueError(f"action {action!r}: expected 'create' or 'update'")
    if not conda_env:
        raise ValueError("worker.conda_env: expected the name of the environment to "
                         f"{action}")
    conda = conda_executable()
    if conda is None:
        raise CondaError("no conda found (set CONDA_EXE or put conda on PATH)")
    spec = Path(kit_dir) / "environment.yml"
    if not spec.exists():
        raise ValueError(f"{spec}: expected the kit's environment.yml")
    return [conda, "env", action, "--name", conda_env, "--file", str(spec)]
