"""The ``worker_type: dask`` section; light, so that validating a config does not import
distributed. The Dask task receives it too (its timeout, sandbox and limits)."""

from __future__ import annotations

import dataclasses

from runner.config import WorkerSection


@dataclasses.dataclass(frozen=True)
class DaskSecurity:
    """TLS settings handed to ``distributed.Security``."""

    tls_ca_file: str
    tls_client_cert: str
    tls_client_key: str
    require_encryption: bool = True


@dataclasses.dataclass(frozen=True)
class DaskWorkerSection(WorkerSection):
    """``worker_type: dask``: run on a dask.distributed cluster."""

    dask_scheduler: str = ""
    conda_env: str | None = None
    n_workers: int | None = None
    dask_security: DaskSecurity | None = None
    remote_kit_dir: str | None = None
    remote_data_dir: str | None = None

    REQUIRED = ("dask_scheduler",)
