"""The ``worker_type: conda`` section; light, so that validating a config imports no backend."""

from __future__ import annotations

import dataclasses

from runner.config import WorkerSection


@dataclasses.dataclass(frozen=True)
class CondaWorkerSection(WorkerSection):
    """``worker_type: conda``: run ramp-test in a local conda environment."""

    conda_env: str | None = None
