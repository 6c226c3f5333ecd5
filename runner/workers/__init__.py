"""Worker classes by ``worker_type``: the built-in ones and those of the entry-point group."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "ramp_runner.workers"

BUILTIN_WORKERS = {
    "conda": "runner.workers.conda:CondaEnvWorker",
    "aws": "runner.workers.aws:AWSWorker",
    "ssh": "runner.workers.ssh:SSHWorker",
    "dask": "runner.workers.dask:DaskWorker",
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
        raise ValueError(f"unknown worker_type {worker_type!r}; known: {known}")
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)
