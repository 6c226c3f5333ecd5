"""Worker classes by ``worker_type``: the built-in ones and those of the entry-point group.

Names only, imported when asked for: the config loader finds a worker type's settings class
here without importing every backend, and without importing the dispatcher's side.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from runner.errors import EventError

ENTRY_POINT_GROUP = "ramp_runner.workers"

BUILTIN_WORKERS = {
    "conda": "runner.local.worker:CondaEnvWorker",
    "aws": "runner.aws.worker:AWSWorker",
    "ssh": "runner.ssh.worker:SSHWorker",
    "dask": "runner.dask.worker:DaskWorker",
}


def registered_worker_types() -> dict[str, str]:
    """Map every known ``worker_type`` to the ``module:Class`` that implements it."""
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    # A third party cannot shadow a built-in worker by reusing its name.
    return {**found, **BUILTIN_WORKERS}


def worker_class(worker_type: str) -> type:
    """Import and return the worker class registered for ``worker_type``."""
    target = registered_worker_types().get(worker_type)
    if target is None:
        known = ", ".join(sorted(registered_worker_types()))
        raise EventError(f"unknown worker_type {worker_type!r}; known: {known}")
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)
