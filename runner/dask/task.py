"""What a Dask worker runs for one submission: bytes in, ramp-test, bytes out.

The task receives the submission as tar bytes and the kit and data either as paths on
the worker's machine or as content hashes whose folders are cached in the worker's local
directory (the dispatcher sends the bytes once, when a worker reports them missing).
ramp-test runs through ``LocalRun`` in a session of its own, which dies with the Dask
worker process. The task blocks one worker
*thread* while it waits for the process, never the worker's event loop, so heartbeats,
data transfers and ``kill_run`` keep flowing: one Dask worker thread per RAMP slot is enough.
This module must be importable on the Dask workers (``pip install ramp-runner``).
"""

from __future__ import annotations

import enum
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import distributed

from runner import archive, blinded, gpus, ingest, livelog, ramptest, results, sandbox
from runner.errors import SubmissionError
from runner.local.conda import conda_env_prefix
from runner.local.process import LocalRun
from runner.scratch import remove_tree

CACHE_FOLDER = "ramp-runner-cache"
# How often a running task checks that the dispatcher still wants it (a cancelled future
# does not stop a thread: a dead dispatcher's run is stopped by this check).
ABANDON_CHECK_SECONDS = 1.0

# The Dask topic on which running tasks send their log's new bytes, at most
# livelog.REFRESH_BYTES per ABANDON_CHECK_SECONDS: one topic for every run, so that what the
# scheduler keeps of it is bounded by its event log's length, whatever the number of runs.
LIVE_TOPIC = "ramp-runner-live-log"

# How long a kill is remembered, to refuse a start that arrives after it (a task and its
# kill travel separately); bounded so a long-lived Dask worker does not grow with every run.
KILL_MEMORY_SECONDS = 3600.0

# Per Dask worker process (shared by every dispatcher using the cluster): the runs going
# on here, and recent kills.
_LOCK = threading.Lock()
_RUNS: dict[str, LocalRun] = {}
_KILLED: dict[str, float] = {}


class TaskOutcome(enum.StrEnum):
    """How a task for one submission ended on its Dask worker."""

    ENDED = "ended"
    TIMEOUT = "timeout"
    KILLED = "killed"
    # The named folders are not cached here: send their bytes, then submit again here.
    MISSING = "missing"
    # This run already started on a Dask worker that died.
    LOST = "lost"
    # sandbox: required and the sandbox does not work here: nothing ran.
    NO_SANDBOX = "no_sandbox"
    # The sandbox could not start the run (``message`` says why).
    EVENT_ERROR = "event_error"


@dataclass(frozen=True)
class TaskResult:
    """What a task sends back to the dispatcher (picklable: plain values and bytes)."""

    outcome: TaskOutcome
    worker: str
    log: bytes = b""
    returncode: int | None = None
    # Why the run is the submission's error though ramp-test may have exited 0: a limit
    # the supervisor enforced, or an unusable training_output.
    stopped: str | None = None
    # The training_output as a compressed tar, when the run succeeded.
    output: bytes | None = None
    peak_memory_mb: float | None = None
    # Why the sandbox does not work on this Dask worker, when it does not.
    no_sandbox: str | None = None
    missing: tuple[str, ...] = ()
    message: str = ""


def run_submission(job: dict[str, Any]) -> TaskResult:
    """Run one submission on this Dask worker and return how it went.

    ``job`` keys: ``run_id``, ``submission``, ``submission_tar`` (bytes), ``kit`` and
    ``data`` (``{"path": ...}`` or ``{"sha": ..., "tar": bytes | None}``), ``conda_env``,
    ``n_threads``, ``settings``: the worker's settings (its timeout, sandbox and limits),
    ``ingest``: whether ``data`` is blinded and the run is the ingestion program
    (runner.blinded) rather than ramp-test, and ``live_log``: whether to send the log's new
    bytes as the run goes (on ``LIVE_TOPIC``: ``{"run", "start", "data"}``).
    """
    worker = distributed.get_worker()
    root = Path(worker.local_directory)
    folders = {name: _folder(job[name], root / CACHE_FOLDER) for name in ("kit", "data")}
    missing = [name for name, folder in folders.items() if folder is None]
    if missing:
        return TaskResult(TaskOutcome.MISSING, worker.address, missing=tuple(missing))
    if not _first_attempt(job["run_id"], worker):
        return TaskResult(TaskOutcome.LOST, worker.address)
    scratch = Path(tempfile.mkdtemp(prefix="ramp-run-", dir=root))
    try:
        return _run(job, folders["kit"], folders["data"], scratch, worker)
    finally:
        remove_tree(scratch)


def kill_run(run_id: str) -> bool:
    """Kill run ``run_id``'s process tree if it runs in this process; a later start is refused.

    Meant for ``Client.run`` (it runs on the worker's event loop, and is quick).
    """
    now = time.monotonic()
    with _LOCK:
        for old in [r for r, at in _KILLED.items() if now - at > KILL_MEMORY_SECONDS]:
            del _KILLED[old]
        _KILLED[run_id] = now
        run = _RUNS.get(run_id)
    if run is None:
        return False
    run.stop()
    return True


def _first_attempt(run_id: str, worker: distributed.Worker) -> bool:
    """Record the start of ``run_id`` with the scheduler; False if it had started before.

    The scheduler silently runs a task again when its worker dies; for a submission that
    must be a ``retry`` counted by the dispatcher, not a hidden second run.
    """
    topic = f"ramp-runner-run-{run_id}"
    if distributed.get_client().get_events(topic):
        return False
    worker.log_event(topic, {"worker": worker.address, "pid": os.getpid()})
    return True


def _folder(source: dict[str, Any], cache: Path) -> Path | None:
    """The kit or data folder on this machine, unpacking shipped bytes into the cache."""
    if source.get("path"):
        path = Path(source["path"])
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a folder on this Dask worker")
        return path
    target = cache / source["sha"]
    if target.is_dir():
        return target
    if source.get("tar") is None:
        return None
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="incoming-", dir=cache))
    try:
        plain = archive.decompress(source["tar"])
        if archive.digest(plain) != source["sha"]:
            raise ValueError(f"shipped folder does not match its hash {source['sha']}")
        archive.unpack(plain, staging / "folder")
        try:
            # Renaming is atomic: a concurrent task sees the whole folder or none.
            (staging / "folder").rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _run(job: dict[str, Any], kit: Path, data: Path, scratch: Path,
         worker: distributed.Worker) -> TaskResult:
    submission, run_id = job["submission"], job["run_id"]
    submissions = scratch / "submissions"
    archive.unpack(job["submission_tar"], submissions / submission)
    prefix = conda_env_prefix(job.get("conda_env"))
    bin_dir = prefix / "bin"
    ramp_test = bin_dir / "ramp-test"
    if not ramp_test.exists():
        raise FileNotFoundError(f"no ramp-test in {bin_dir} on Dask worker {worker.address}")
    read_only, hidden = [kit, data], []
    if job.get("ingest"):
        argv = blinded.ingest_command(str(bin_dir / "python"), ingest.__file__, kit, data,
                                      str(submissions), submission)
        read_only.append(Path(ingest.__file__))
        # As on the other backends: the kit's own data/ (labels included) is not the run's.
        hidden = [kit / "data"] if (kit / "data").is_dir() else []
    else:
        argv = ramptest.command(submission, str(kit), str(data), str(submissions),
                                ramp_test=str(ramp_test))
    env = ramptest.child_environment(job.get("n_threads"), extra_path=str(bin_dir))
    log_path = scratch / "log"
    settings = job["settings"]
    run_gpus = _worker_gpus(settings.gpus_per_run, worker, env)
    mode = settings.sandbox
    works, why = sandbox.probe() if mode != "off" else (True, "")
    # Said to the dispatcher, which decides and warns (an exception would be a lost run).
    no_sandbox = None if works else why
    if no_sandbox is not None and mode == "required":
        return TaskResult(TaskOutcome.NO_SANDBOX, worker.address, no_sandbox=no_sandbox)
    confinement = sandbox.confinement(
        settings, sandbox.use_sandbox(mode, f"Dask worker {worker.address}"),
        read_only=read_only, writable=[submissions / submission], tmp=scratch / "tmp",
        hidden=hidden, cpus=job.get("n_threads"), gpus=run_gpus)
    with _LOCK:
        if run_id in _KILLED:
            return TaskResult(TaskOutcome.KILLED, worker.address)
        run = LocalRun(argv, env, log_path, cwd=scratch, confinement=confinement)
        _RUNS[run_id] = run
    try:
        forward = _LiveForward(worker, run_id, log_path) if job.get("live_log") else None
        outcome = _wait(run, float(settings.timeout), worker, forward)
        run.stop()
        if outcome is TaskOutcome.ENDED and run_id in _KILLED:
            outcome = TaskOutcome.KILLED
        reason = run.stop_reason if outcome is TaskOutcome.ENDED else None
        if reason is not None and reason.get("fault") == "event":
            # The log holds bubblewrap's words only (nothing of the submission ran), and
            # it is not installed: its last line goes with the message.
            said = log_path.read_bytes()[-500:].decode(errors="replace").strip().splitlines()
            return TaskResult(TaskOutcome.EVENT_ERROR, worker.address, no_sandbox=no_sandbox,
                              message=f"{reason.get('message')} ({(said or ['no output'])[-1]})")
        stopped = reason.get("message") if reason is not None else None
        output = submissions / submission / "training_output"
        ok = outcome is TaskOutcome.ENDED and run.returncode == 0 and stopped is None \
            and output.is_dir() and not output.is_symlink()
        if ok:
            # Packing follows links: a link or a FIFO must be refused before, here.
            try:
                results.check_tree(output, settings.output_limit_mb * results.MIB)
            except SubmissionError as error:
                ok, stopped = False, str(error)
        return TaskResult(
            outcome, worker.address, log=log_path.read_bytes(), returncode=run.returncode,
            stopped=stopped, output=archive.compress(archive.pack(output)) if ok else None,
            peak_memory_mb=run.peak_memory_mb, no_sandbox=no_sandbox)
    finally:
        with _LOCK:
            _RUNS.pop(run_id, None)
        run.stop()
        run.cleanup()


def _worker_gpus(per_run: int, worker: distributed.Worker,
                 env: dict[str, str]) -> tuple[int, ...]:
    """With ``gpus_per_run``, the GPUs this Dask worker holds (its Slurm job's), shown to
    the run as the worker is shown them; GPUError (a lost run: the cluster's fault) when
    it holds fewer."""
    if not per_run:
        return ()
    held = gpus.allocated(os.environ)
    if len(held) < per_run:
        raise gpus.GPUError(f"Dask worker {worker.address} holds GPUs {list(held)}, fewer "
                            f"than gpus_per_run={per_run} (start it in a job with "
                            f"--gres=gpu:{per_run}, or with CUDA_VISIBLE_DEVICES)")
    env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(
        map(str, held))
    return held


class _LiveForward:
    """Sends the run's log's new bytes to the dispatcher (``runner.livelog``), the newest
    ``REFRESH_BYTES`` at most each time."""

    def __init__(self, worker: distributed.Worker, run_id: str, log_path: Path):
        self.worker, self.run_id, self.log_path = worker, run_id, log_path
        self.offset = 0

    def __call__(self) -> None:
        try:
            with open(self.log_path, "rb") as log:
                size = os.fstat(log.fileno()).st_size
                if size <= self.offset:
                    return
                start = livelog.window(size, self.offset)
                log.seek(start)
                data = log.read(livelog.REFRESH_BYTES)
        except OSError:
            return
        self.offset = start + len(data)
        self.worker.log_event(LIVE_TOPIC, {"run": self.run_id, "start": start, "data": data})


def _wait(run: LocalRun, timeout: float, worker: distributed.Worker,
          forward: _LiveForward | None = None) -> TaskOutcome:
    """Wait for ``run`` to end: ``ENDED``, or ``TIMEOUT``/``KILLED`` after stopping it;
    ``forward`` the log's new bytes at each check."""
    key = worker.get_current_task()
    deadline = time.monotonic() + timeout
    while True:
        if forward is not None:
            forward()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            run.stop()
            return TaskOutcome.TIMEOUT
        if run.wait(min(ABANDON_CHECK_SECONDS, remaining)):
            return TaskOutcome.ENDED
        if _abandoned(worker, key):
            run.stop()
            return TaskOutcome.KILLED


def _abandoned(worker: distributed.Worker, key: Any) -> bool:
    """Whether the scheduler no longer wants this task (cancelled, or its client is gone)."""
    state = worker.state.tasks.get(key)
    return state is None or state.state in ("cancelled", "released", "forgotten")
