"""DaskWorker (``worker_type: dask``): one submission as one task on a dask.distributed cluster.

Nothing is shared but the scheduler's address: the submission travels as tar bytes, the
kit and data are found at ``remote_kit_dir``/``remote_data_dir`` on the Dask workers or
shipped once per Dask worker (cached there by content hash), and the log and predictions
come back as bytes. The task itself is ``runner.dask.task.run_submission``; stopping a run
kills its process tree on the Dask worker (``runner.dask.task.kill_run``), not only the future.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import distributed
from distributed.comm import get_address_host_port

from runner import archive, ramptest, sandbox
from runner.config import DispatchFacts
from runner.dask import task as dask_task
from runner.dask.settings import DaskWorkerSection
from runner.dask.task import TaskOutcome, TaskResult
from runner.errors import ConfigError, EventError, SubmissionError
from runner.livelog import LiveCopy
from runner.local.conda import CondaError, conda_env_prefix
from runner.results import RunEnd
from runner.worker import (
    BaseWorker,
    RunArtifacts,
    RunState,
    WorkerStatus,
    check_data_dir,
    check_kit_dir,
)

logger = logging.getLogger("runner.worker")

CONNECT_TIMEOUT = "20s"
# How long a stopped run may take to send back its log before it is given up.
KILL_GRACE_SECONDS = 30.0
# One short connection attempt: a scheduler that is not there must not cost minutes.
SCHEDULER_CONNECT_SECONDS = 3.0
MIB = 1024 * 1024



class DaskWorker(BaseWorker):
    """Run a submission with ramp-test on a Dask worker, local or remote, plain or TLS."""

    settings_class = DaskWorkerSection
    runs_ingestion = True

    def __init__(self, config: dict[str, Any], submission: str):
        super().__init__(config, submission)
        source = f"{type(self).__name__} config"
        dispatch = self.settings.dispatch
        self._security = security_of(self.settings, dispatch.event_dir, source)
        self._run_id = f"{dispatch.event_name or 'event'}-{submission}-{uuid.uuid4().hex[:12]}"
        self._client: distributed.Client | None = None
        self._job: dict[str, Any] | None = None
        self._future: distributed.Future | None = None
        self._done = threading.Event()
        self._task_result: TaskResult | None = None
        self._shipped: list[distributed.Future] = []
        self._submits = 0
        # The live copy of the run's log (runner.livelog), fed by the task's events.
        self._live = LiveCopy(None, submission, 0)
        self._listening = False

    @classmethod
    def preflight(cls, config: dict[str, Any]) -> list[str]:
        """The scheduler must answer at ``dask_scheduler``."""
        check_scheduler(cls.config_source(config), cls.settings_of(config).dask_scheduler)
        return []

    @classmethod
    def check_event_files(cls, config: dict[str, Any]) -> None:
        """The kit and data are checked here unless the Dask workers have their own copy
        (``remote_kit_dir``, ``remote_data_dir``), which only a run there can see."""
        settings, source = cls.settings_of(config), cls.config_source(config)
        if not settings.remote_kit_dir:
            check_kit_dir(source, settings.kit_dir)
        if not settings.remote_data_dir:
            check_data_dir(source, settings.data_dir)

    # -- the contract ---------------------------------------------------------------------

    def setup(self) -> None:
        """Check the config as ramp-engine does, connect to the scheduler, find the conda
        environment on a Dask worker, pack the submission and find or pack the kit and data.

        A missing key or an unknown ``conda_env`` raises ValueError (EventError) naming
        it; the latter leaves ``status == 'error'``, as ramp-engine's DaskWorker does.
        """
        self.require_keys("dask_scheduler")
        # Connected before the paths are checked: ramp-engine's tests close the client of
        # a worker whose setup failed on a missing key.
        self._client = connect(self.settings, self._security)
        settings = self.read_config()
        conda_env = settings.conda_env
        try:
            prefix = self._client.submit(conda_env_prefix, conda_env, pure=False).result()
        except CondaError as error:
            self.status = WorkerStatus.ERROR
            raise CondaError(f"The specified conda environment {conda_env} does not exist. "
                             f"(on the Dask worker: {error})") from None
        # Where ramp-engine's DaskWorker keeps the environment's bin folder.
        self._python_bin_path = str(prefix / "bin")
        folder = self.submission_folder()
        try:
            packed = archive.pack(folder, skip=("training_output",))
        except archive.UnsafeArchiveError as error:
            raise SubmissionError(f"the submission cannot be sent to the cluster: {error}") \
                from None
        self._job = {
            "run_id": self._run_id,
            "submission": self.submission,
            "submission_tar": archive.compress(packed),
            "kit": self._source("kit", settings.remote_kit_dir),
            # With hidden test labels the blinded data goes instead of the data folder.
            "data": self._source("data",
                                 None if self.hidden_labels else settings.remote_data_dir),
            "ingest": self.hidden_labels is not None,
            "conda_env": conda_env,
            "n_threads": settings.dispatch.n_threads,
            # Its timeout, sandbox and limits; whether the sandbox works is asked on the
            # Dask worker that runs the task. None of the dispatcher's own facts.
            "settings": dataclasses.replace(settings, dispatch=DispatchFacts()),
            "live_log": settings.dispatch.live_log_dir is not None,
        }
        super().setup()

    # -- the run's execution interface ------------------------------------------------------

    def start_run(self) -> None:
        """Submit the run as one task; its end wakes ``wait`` (no polling). The log's new
        bytes the task sends as it runs go to the live copy."""
        self._live = LiveCopy(self.settings.dispatch.live_log_dir, self.submission,
                              self.settings.log_limit_mb * MIB)
        if self._live.start() is not None:
            self._client.subscribe_topic(dask_task.LIVE_TOPIC, self._on_live_bytes)
            self._listening = True
        self._submit(self._job)

    def _on_live_bytes(self, event: tuple[float, Any]) -> None:
        """One event of the live topic (every run's): this run's bytes are kept."""
        message = event[1]
        if isinstance(message, dict) and message.get("run") == self._run_id:
            self._live.add(bytes(message.get("data") or b""), int(message.get("start") or 0))

    def poll_run(self) -> RunState:
        """Lost with the scheduler, or when the cluster dropped the task or ran it twice;
        a task that found the kit or data missing is sent them and submitted again."""
        future = self._future
        if future.status == "lost":
            logger.warning("%r: the connection to the scheduler was lost", self)
            return RunState.LOST
        if future.status in ("error", "cancelled"):
            # Cancelled by the cluster, not by us (kill() leaves "running" first): the
            # shipped kit or data died with their Dask worker before the task could start.
            logger.warning("%r: the task %s on the cluster: %r", self, future.status,
                           future.exception())
            return RunState.LOST
        if not future.done():
            return RunState.RUNNING
        result = self._result()
        if result.outcome is TaskOutcome.LOST:
            return RunState.LOST
        if result.outcome is TaskOutcome.MISSING:
            self._ship(result)
            return RunState.RUNNING
        return RunState.ENDED

    def wait(self, timeout: float) -> None:
        """Block until the task's future is done, ``kill`` is called, or ``timeout`` passes."""
        deadline = time.monotonic() + max(0.0, timeout)
        while self.status == "running" and not self._wakeup.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._done.wait(remaining)

    def stop_run(self) -> None:
        """Cancel the task and kill its process tree on whichever Dask worker runs it."""
        if self._future is not None and not self._future.done():
            self._kill_remote(cancel=True)
        self._done.set()

    def fetch_run(self, timed_out: bool) -> RunArtifacts:
        """The log and, on success, the predictions the Dask worker sent back."""
        if timed_out:
            # The task answers a remote kill with the log so far: wait a little for it.
            self._kill_remote(cancel=False)
            self._done.wait(KILL_GRACE_SECONDS)
        result = self._result() if self._future.done() else None
        if result is not None:
            self._judge_sandbox(result)
            if result.outcome is TaskOutcome.EVENT_ERROR:
                raise EventError(ramptest.bounded(
                    f"on Dask worker {result.worker}: {result.message}"))
        log_file = self.scratch / "log"
        log_file.write_bytes(result.log if result is not None else b"")
        self._live.catch_up(result.log if result is not None else b"")
        output = None
        outcome = result.outcome if result is not None else None
        if timed_out or outcome is TaskOutcome.TIMEOUT:
            end = RunEnd(None, timed_out=True)
        elif outcome is TaskOutcome.ENDED and result.stopped and result.returncode == 0:
            # A training_output refused on the Dask worker (a limit never ends with 0).
            end = RunEnd(0, refused=result.stopped)
        elif outcome is TaskOutcome.ENDED and result.stopped:
            end = RunEnd(None, stopped=result.stopped)  # a limit
        elif outcome is TaskOutcome.ENDED:
            end = RunEnd(result.returncode)
            if result.output is not None:
                output = self.scratch / "training_output"
                archive.unpack(result.output, output)
        else:
            why = outcome or "no answer from the cluster"
            end = RunEnd(None, stopped=f"on the Dask worker ({why})")
        peak_memory_mb = result.peak_memory_mb if result is not None else None
        return RunArtifacts(log_file, output, end, peak_memory_mb)

    def release_run(self) -> None:
        """Release the task's futures and the shipped bytes, and close the connection,
        whatever happened before."""
        self._live.remove()
        if self._client is not None:
            if self._listening:
                self._client.unsubscribe_topic(dask_task.LIVE_TOPIC)
                self._listening = False
            futures = [f for f in (self._future, *self._shipped) if f is not None]
            for future in futures:
                future.release()
            self._future, self._shipped = None, []
            # Closed, not forgotten: ramp-engine's tests close ``worker._client`` again.
            self._client.close(timeout=10)

    # -- helpers ----------------------------------------------------------------------------

    def _local_folder(self, name: str) -> str:
        """The folder shipped as the task's ``kit`` or ``data``: the blinded data rather
        than the data folder when the test labels are hidden."""
        if name == "data" and self.hidden_labels is not None:
            return str(self.hidden_labels.folder)
        return getattr(self.settings, f"{name}_dir")

    def _source(self, name: str, remote_path: str | None) -> dict[str, Any]:
        """How the task finds the kit or data: a path on the Dask worker, or a content hash."""
        if remote_path:
            return {"path": remote_path}
        try:
            sha, _ = packed_folder(self._local_folder(name), self._pack_cache)
        except archive.UnsafeArchiveError as error:
            raise EventError(f"worker.{name}_dir cannot be shipped to the cluster: {error} "
                             f"(or give worker.remote_{name}_dir, a folder on the Dask "
                             "workers)") from None
        return {"sha": sha, "tar": None}

    @property
    def _pack_cache(self) -> Path:
        # Beside the scratch folders, so that the dispatcher's start-up reaping bounds it too.
        parent = self.settings.dispatch.scratch_dir or tempfile.gettempdir()
        return Path(parent) / "dask-packs"

    def _submit(self, job: dict[str, Any]) -> None:
        self._submits += 1
        done = threading.Event()
        self._done, self._task_result = done, None
        future = self._client.submit(dask_task.run_submission, job, pure=False,
                                     key=f"ramp-runner-{self._run_id}-{self._submits}")
        # Called from the client's thread when the task ends, errs or is cancelled.
        future.add_done_callback(lambda _: done.set())
        self._future = future

    def _ship(self, result: TaskResult) -> None:
        """Send the folders a Dask worker misses, then submit the run again next to them."""
        job = dict(self._job)
        address = result.worker
        for name in result.missing:
            _, tar = packed_folder(self._local_folder(name), self._pack_cache)
            logger.info("%r: shipping %s (%d kB) to %s", self, name, len(tar) // 1024, address)
            shipped = self._client.scatter(tar, workers=[address], hash=False)
            self._shipped.append(shipped)
            job[name] = {**job[name], "tar": shipped}
        # Another worker may take the task if this one is gone; the bytes follow it there.
        self._submit(job)

    def _result(self) -> TaskResult | None:
        """The task's result once it finished (None if it erred or was cancelled)."""
        if self._task_result is None and self._future.status == "finished":
            self._task_result = self._future.result()
        return self._task_result

    def _judge_sandbox(self, result: TaskResult) -> None:
        """``sandbox: required`` where the Dask worker could not sandbox is the event's
        EventError; ``auto`` warns here, once per Dask worker (``runner.sandbox``)."""
        why = result.no_sandbox
        if why is None:
            return
        # One line, as for SSH hosts: bubblewrap's last words say why.
        last = str(why).strip().splitlines()[-1:] or ["the sandbox check failed"]
        sandbox.use_sandbox(self.settings.sandbox, type(self).__name__, (False, last[0][:500]),
                            where=f"Dask worker {result.worker}")

    def _kill_remote(self, cancel: bool) -> None:
        """Kill the run's process tree on every Dask worker that has it (best effort)."""
        try:
            if cancel and self._future is not None:
                self._future.cancel()
            self._client.run(dask_task.kill_run, self._run_id, on_error="ignore",
                             callback_timeout=10)
        except Exception as error:  # a lost scheduler must not stop the shutdown
            logger.warning("%r: could not kill the run on the cluster: %s", self, error)


def check_scheduler(source: str, address: str) -> None:
    """Raise ConfigError unless a scheduler answers at ``address`` (one short attempt)."""
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


def security_of(settings: DaskWorkerSection, event_dir: str | None,
                source: str) -> distributed.Security | None:
    """The ``distributed.Security`` of ``dask_security`` (relative files: the event folder)."""
    tls = settings.dask_security
    if tls is None:
        return None
    if not settings.dask_scheduler.startswith("tls://"):
        raise ConfigError(source, "worker.dask_scheduler", "a tls:// address with dask_security",
                          repr(settings.dask_scheduler))
    files = {}
    for key in ("tls_ca_file", "tls_client_cert", "tls_client_key"):
        path = Path(os.path.expanduser(getattr(tls, key)))
        if not path.is_absolute() and event_dir:
            path = Path(event_dir) / path
        if not path.is_file():
            raise ConfigError(source, f"worker.dask_security.{key}", "a readable file",
                              str(path))
        files[key] = str(path)
    return distributed.Security(**files, require_encryption=tls.require_encryption)


def connect(settings: DaskWorkerSection,
            security: distributed.Security | None) -> distributed.Client:
    """A client of the event's scheduler, not made the process-wide default."""
    return distributed.Client(settings.dask_scheduler, security=security,
                              timeout=CONNECT_TIMEOUT, set_as_default=False)


def packed_folder(folder: str | os.PathLike[str], cache: Path) -> tuple[str, bytes]:
    """``(content hash, gzip tar)`` of ``folder``, packed again only when its files change.

    Packs are kept in ``cache`` (one per folder), not in memory: a data set can be large,
    and nothing outlives the dispatcher that made it.
    """
    folder = Path(folder).resolve()
    name = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    stamp = hashlib.sha256(repr(archive.fingerprint(folder)).encode()).hexdigest()[:16]
    packed, sha_file = cache / f"{name}-{stamp}.tar.gz", cache / f"{name}-{stamp}.sha"
    if not packed.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        for old in cache.glob(f"{name}-*"):
            if not old.name.startswith(f"{name}-{stamp}"):
                old.unlink(missing_ok=True)
        plain = archive.pack(folder)
        # Each file written aside, then renamed, the hash first: a concurrent slot that
        # sees the pack also sees its hash.
        _replace_bytes(sha_file, archive.digest(plain).encode())
        _replace_bytes(packed, archive.compress(plain))
    return sha_file.read_text(), packed.read_bytes()


def _replace_bytes(path: Path, data: bytes) -> None:
    handle, partial = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(handle, "wb") as file:
        file.write(data)
    os.replace(partial, path)
