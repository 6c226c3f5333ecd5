"""The ``worker_type: conda`` section; light, so that validating a config imports no backend."""

from __future__ import annotations

import dataclasses

from runner.config import WorkerSection, check_gpu_list


@dataclasses.dataclass(frozen=True)
class CondaWorkerSection(WorkerSection):
    """``worker_type: conda``: run ramp-test in a local conda environment."""

    conda_env: str | None = None
    # This machine's GPUs (nvidia-smi -L numbering); None: as nvidia-smi -L lists them.
    gpus: tuple[int, ...] | None = None

    def check(self, source: str, key_path: str) -> None:
        """Refuse a GPU list that cannot be one."""
        super().check(source, key_path)
        check_gpu_list(self.gpus, self.gpus_per_run, source, f"{key_path}.gpus")
