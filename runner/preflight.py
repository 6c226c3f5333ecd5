"""Checks run before anything starts (``check-config``, ``dispatch``): what the organiser
got wrong fails here with one line naming the file, the key and what was expected, instead
of as a ``training_error`` per submission later.

Generic checks live here; each worker type adds its own through ``BaseWorker.preflight``.
"""

from __future__ import annotations

import os
from pathlib import Path

from runner import blinded, gpus
from runner.config import EventConfig, WorkerSection
from runner.errors import ConfigError
from runner.registry import worker_class


def preflight(config: EventConfig) -> list[str]:
    """Check the event's folders, its environment and its worker type; return warnings.

    Raises ConfigError (an EventError) at the first problem; writes nothing.
    """
    source = str(config.path)
    worker = config.worker
    cls = worker_class(worker.worker_type)
    # The kit and data are the worker type's to check: it knows where its runs read them.
    cls.check_event_files(config.worker_dict())
    _check_folder(source, "worker.submissions_dir", Path(worker.submissions_dir))
    _check_writable(source, "worker.predictions_dir", Path(worker.predictions_dir))
    _check_writable(source, "worker.logs_dir", Path(worker.logs_dir))
    _check_writable(source, "dispatcher.ledger", config.ledger_path.parent)
    _check_gpus(source, config)
    warnings = _check_hidden_labels(source, worker, cls.runs_ingestion)
    # A third party's preflight written to the README returns nothing.
    return [*warnings, *(cls.preflight(config.worker_dict()) or [])]


def _check_hidden_labels(source: str, worker: WorkerSection, runs_ingestion: bool) -> list[str]:
    """Whether the runs can keep the test labels out of the participant's process."""
    if worker.hidden_test_labels == "off":
        return []
    why = blinded.why_not_hidden(worker, runs_ingestion)
    if why is None:
        return []
    if worker.hidden_test_labels == "required":
        raise ConfigError(source, "worker.hidden_test_labels", "a kit and worker type that "
                          "can hide the test labels (or hidden_test_labels: auto | off)",
                          f"required, but {why}")
    return [blinded.not_hidden_warning(why)]


def _check_gpus(source: str, config: EventConfig) -> None:
    """Runs that take GPUs on hosts the worker type lists (``gpu_hosts``: this machine,
    SSH hosts): every slot must have ``gpus_per_run`` GPUs of its own."""
    per_run = config.worker.gpus_per_run
    hosts = worker_class(config.worker.worker_type).gpu_hosts(config.worker_dict()) \
        if per_run else None
    if hosts is None:
        return
    fit, said = gpus.capacity(hosts, per_run)
    if config.dispatcher.slots > fit:
        raise ConfigError(source, "dispatcher.n_workers", f"at most {said}",
                          f"{config.dispatcher.n_workers} ({config.dispatcher.slots} slots)")



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
