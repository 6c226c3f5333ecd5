"""Worker classes by ``worker_type``: the built-in ones and those of the entry-point group.

Names only, imported when asked for: the config loader finds a worker type's settings class
here without importing every backend, and without importing the dispatcher's side.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from runner.errors import EventError

ENTRY_POINT_GROUP = "ramp_runner.workers"

# worker_type: (its worker class, its settings class). The settings live in light modules,
# so that validating a config imports neither a backend nor fabric, boto3 or distributed.
BUILTIN_WORKERS = {
    "conda": ("runner.local.worker:CondaEnvWorker", "runner.local.settings:CondaWorkerSection"),
    "aws": ("runner.aws.worker:AWSWorker", "runner.aws.settings:AWSWorkerSection"),
    "ssh": ("runner.ssh.worker:SSHWorker", "runner.ssh.settings:SSHWorkerSection"),
    "dask": ("runner.dask.worker:DaskWorker", "runner.dask.settings:DaskWorkerSection"),
}


def registered_worker_types() -> dict[str, str]:
    """Map every known ``worker_type`` to the ``module:Class`` that implements it."""
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    # A third party cannot shadow a built-in worker by reusing its name.
    return {**found, **{name: worker for name, (worker, _) in BUILTIN_WORKERS.items()}}


def worker_class(worker_type: str) -> type:
    """Import and return the worker class registered for ``worker_type``."""
    target = registered_worker_types().get(worker_type)
    if target is None:
        known = ", ".join(sorted(registered_worker_types()))
        raise EventError(f"unknown worker_type {worker_type!r}; known: {known}")
    return _load(target)


def settings_class(worker_type: str) -> type:
    """The dataclass that validates ``worker_type``'s section: a built-in worker's without
    importing the worker; a third party's is its worker class's ``settings_class``."""
    if worker_type in BUILTIN_WORKERS:
        return _load(BUILTIN_WORKERS[worker_type][1])
    return worker_class(worker_type).settings_class


def _load(target: str) -> type:
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)
