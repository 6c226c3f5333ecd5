"""Checks run before anything starts (``check-config``, ``dispatch``): what the organiser
got wrong fails here with one line naming the file, the key and what was expected, instead
of as a ``training_error`` per submission later.

Generic checks live here; each worker type adds its own through ``BaseWorker.preflight``.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from runner.config import EventConfig
from runner.errors import ConfigError
from runner.registry import worker_class

# One short connection attempt: a scheduler that is not there must not cost minutes.
SCHEDULER_CONNECT_SECONDS = 3.0


def preflight(config: EventConfig) -> list[str]:
    """Check the event's folders, its environment and its worker type; return warnings.

    Raises ConfigError (an EventError) at the first problem; writes nothing.
    """
    source = str(config.path)
    worker = config.worker
    warnings: list[str] = []
    if not getattr(worker, "remote_kit_dir", None):
        _check_kit(source, Path(worker.kit_dir))
    if not getattr(worker, "remote_data_dir", None):
        _check_data(source, Path(worker.data_dir))
    _check_folder(source, "worker.submissions_dir", Path(worker.submissions_dir))
    _check_writable(source, "worker.predictions_dir", Path(worker.predictions_dir))
    _check_writable(source, "worker.logs_dir", Path(worker.logs_dir))
    _check_writable(source, "dispatcher.ledger", config.ledger_path.parent)
    cls = worker_class(worker.worker_type)
    from runner.local.worker import CondaEnvWorker

    if issubclass(cls, CondaEnvWorker):
        warnings += _check_conda(source, getattr(worker, "conda_env", None))
        warnings += _check_sandbox(source, worker.sandbox)
    scheduler = getattr(worker, "dask_scheduler", None)
    if scheduler:
        _check_scheduler(source, scheduler)
    cls.preflight(config.worker_dict())
    return warnings


def _check_kit(source: str, kit: Path) -> None:
    if not kit.is_dir():
        raise ConfigError(source, "worker.kit_dir", "the kit's folder", f"{kit} (no such folder)")
    if not (kit / "problem.py").is_file():
        raise ConfigError(source, "worker.kit_dir", "a kit folder holding problem.py",
                          f"{kit} (no problem.py)")


def _check_data(source: str, data: Path) -> None:
    if not data.is_dir():
        raise ConfigError(source, "worker.data_dir", "the data folder",
                          f"{data} (no such folder)")
    if not (data / "data").is_dir() and not (data / "prepare_data.py").is_file():
        raise ConfigError(source, "worker.data_dir", "a folder holding data/ or prepare_data.py",
                          f"{data} (neither)")


def _check_folder(source: str, key: str, folder: Path) -> None:
    if not folder.is_dir():
        raise ConfigError(source, key, "an existing folder", f"{folder} (no such folder)")


def _check_writable(source: str, key: str, folder: Path) -> None:
    """The folder, or the nearest folder it would be created in, must be writable."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(source, key, "a folder that can be created",
                          f"{folder} ({existing} is not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(source, key, "a writable folder", f"{folder} ({existing} is read-only)")


def _check_conda(source: str, conda_env: str | None) -> list[str]:
    from runner.local.conda import CondaError, conda_env_prefix, conda_executable

    warnings = []
    if conda_executable() is None and conda_env is None:
        warnings.append(f"no conda found: submissions run in this Python environment "
                        f"({sys.prefix})")
    try:
        prefix = conda_env_prefix(conda_env)
    except CondaError as error:
        raise ConfigError(source, "worker.conda_env", "an existing conda environment",
                          str(error)) from None
    ramp_test = prefix / "bin" / "ramp-test"
    if not ramp_test.exists():
        raise ConfigError(source, "worker.conda_env", "an environment with ramp-workflow "
                          "installed", f"no {ramp_test}")
    return warnings


def _check_sandbox(source: str, mode: str) -> list[str]:
    """Local runs: the sandbox must work when required, and its absence is said loudly."""
    from runner import sandbox

    if mode == "off":
        return []
    works, why = sandbox.probe()
    if works:
        return []
    if mode == "required":
        raise ConfigError(source, "worker.sandbox", "a sandbox that works on this machine "
                          "(or sandbox: auto | off)", f"required, but {why}")
    return [f"SUBMISSIONS ARE NOT ISOLATED: the sandbox does not work on this machine ({why}); "
            "they run with the dispatcher's rights and can read and change the event's "
            "files (install bubblewrap, or set worker.sandbox: off to silence this)"]


def _check_scheduler(source: str, address: str) -> None:
    from distributed.comm import get_address_host_port

    try:
        host, port = get_address_host_port(address)
    except ValueError as error:
        raise ConfigError(source, "worker.dask_scheduler", "a scheduler address such as "
                          "tcp://127.0.0.1:8786", f"{address!r} ({error})") from None
    try:
        socket.create_connection((host, port), timeout=SCHEDULER_CONNECT_SECONDS).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(source, "worker.dask_scheduler", "a Dask scheduler listening at "
                          f"{address}", f"nothing there ({reason})") from None
