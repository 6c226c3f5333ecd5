"""Whether and how a run is confined: the worker keys ``sandbox``, ``network`` and limits.

The confinement itself is ``runner/supervise.py``'s (bubblewrap and the limits), so that
every host that runs the supervisor confines the same way; this module decides, on the
machine that starts a run, what to ask of it.
"""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from runner import supervise
from runner.config import WorkerSection
from runner.errors import EventError

logger = logging.getLogger("runner.sandbox")

LIMITS = ("memory_limit_mb", "output_limit_mb", "log_limit_mb", "max_processes")


@functools.cache
def probe() -> tuple[bool, str]:
    """(works, why not): whether the sandbox works on this machine (asked once)."""
    completed = subprocess.run(
        [sys.executable, supervise.__file__, "--check-sandbox"], capture_output=True,
        text=True, check=False, stdin=subprocess.DEVNULL)
    if completed.returncode == 0:
        return True, ""
    return False, (completed.stdout + completed.stderr).strip().removeprefix(
        "sandbox: does not work: ")


def available() -> bool:
    """Whether submissions can run in the sandbox here (for check-config and preflight)."""
    return probe()[0]


@functools.cache
def _warn_once(owner: str, where: str, why: str) -> None:
    logger.warning("%s: submissions are NOT isolated on %s: the sandbox does not work there "
                   "(%s); they run with the rights of the user who starts them and can read "
                   "and change what that user can. Install bubblewrap there or set "
                   "worker.sandbox: off to silence this.", owner, where, why)


def use_sandbox(mode: str, owner: str, probed: tuple[bool, str] | None = None,
                where: str = "this machine") -> bool:
    """Whether to sandbox a run under worker key ``sandbox`` = ``mode`` (auto|required|off).

    ``probed`` is ``(works, why not)`` of the machine the run goes to (default: this one,
    ``probe()``). ``auto`` without a working sandbox warns once per ``owner`` and place;
    ``required`` raises EventError (the event's fault: checking_error).
    """
    if mode == "off":
        return False
    works, why = probed or probe()
    if works:
        return True
    if mode == "required":
        raise EventError(f"worker.sandbox: required, but the sandbox does not work on "
                         f"{where}: {why}")
    _warn_once(owner, where, why)
    return False


@dataclass(frozen=True)
class Confinement:
    """What the supervisor is asked for one run: sandbox, visible folders, limits."""

    sandbox: bool
    network: bool
    read_only: tuple[str, ...]
    writable: tuple[str, ...]
    # Folders the sandbox shows empty (a host's other submissions share the kit folder).
    hidden: tuple[str, ...]
    tmp: str
    limits: Mapping[str, int]
    # The worker's n_threads: the cores the run may use (None: not confined).
    cpus: int | None = None

    def options(self) -> list[str]:
        """The ``supervise.py`` options (before ``--``) for this confinement."""
        options = ["--tmp", self.tmp]
        for name in LIMITS:
            options += [f"--{name.replace('_', '-')}", str(int(self.limits[name]))]
        if self.cpus:
            options += ["--cpus", str(int(self.cpus))]
        if self.sandbox:
            options.append("--sandbox")
            if self.network:
                options.append("--network")
            for path in self.read_only:
                options += ["--ro", path]
            for path in self.writable:
                options += ["--rw", path]
            for path in self.hidden:
                options += ["--hide", path]
        return options


def confinement(settings: WorkerSection, sandboxed: bool, read_only: Sequence[str | Path],
                writable: Sequence[str | Path], tmp: str | Path,
                hidden: Sequence[str | Path] = (), cpus: int | None = None) -> Confinement:
    """The confinement of a run under a worker's ``settings``, wherever it runs.

    ``sandboxed`` is ``use_sandbox``'s answer on the machine the run goes to (this one, an
    SSH host, a Dask worker): only that machine can say whether the sandbox works there.
    """
    return Confinement(
        sandbox=sandboxed,
        network=settings.network,
        read_only=tuple(map(str, read_only)),
        writable=tuple(map(str, writable)),
        hidden=tuple(map(str, hidden)),
        tmp=str(tmp),
        limits={name: getattr(settings, name) for name in LIMITS},
        cpus=cpus,
    )
