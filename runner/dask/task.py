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

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import distributed

from runner import archive, ramptest, results, sandbox
from runner.errors import SubmissionError
from runner.local.conda import conda_env_prefix
from runner.local.process import LocalRun

CACHE_FOLDER = "ramp-runner-cache"
# How often a running task checks that the dispatcher still wants it (a cancelled future
# does not stop a thread: a dead dispatcher's run is stopped by this check).
ABANDON_CHECK_SECONDS = 1.0

# How long a kill is remembered, to refuse a start that arrives after it (a task and its
# kill travel separately); bounded so a long-lived Dask worker does not grow with every run.
KILL_MEMORY_SECONDS = 3600.0

# Per Dask worker process (shared by every dispatcher using the cluster): the runs going
# on here, and recent kills.
_LOCK = threading.Lock()
_RUNS: dict[str, LocalRun] = {}
_KILLED: dict[str, float] = {}


def run_submission(job: dict[str, Any]) -> dict[str, Any]:
    """Run one submission on this Dask worker and return its outcome as plain data.

    ``job`` keys: ``run_id``, ``submission``, ``submission_tar`` (bytes), ``kit`` and
    ``data`` (``{"path": ...}`` or ``{"sha": ..., "tar": bytes | None}``), ``conda_env``,
    ``n_threads``, and ``settings``: the worker's settings (its timeout, sandbox and
    limits). The result's ``status`` is ``ended``, ``timeout``,
    ``killed``, ``missing`` (send the named folders' bytes, then submit again here),
    ``lost`` (this run already started on a Dask worker that died), ``no_sandbox``
    (``sandbox: required`` and the sandbox does not work here: nothing ran) or
    ``event_error`` (the sandbox could not start the run; ``message`` says why). Its
    ``no_sandbox`` is why the sandbox does not work here, when it does not (else None).
    """
    worker = distributed.get_worker()
    root = Path(worker.local_directory)
    folders = {name: _folder(job[name], root / CACHE_FOLDER) for name in ("kit", "data")}
    missing = [name for name, folder in folders.items() if folder is None]
    if missing:
        return {"status": "missing", "missing": missing, "worker": worker.address}
    if not _first_attempt(job["run_id"], worker):
        return {"status": "lost", "worker": worker.address}
    scratch = Path(tempfile.mkdtemp(prefix="ramp-run-", dir=root))
    try:
        return _run(job, folders["kit"], folders["data"], scratch, worker)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


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
         worker: distributed.Worker) -> dict[str, Any]:
    submission, run_id = job["submission"], job["run_id"]
    submissions = scratch / "submissions"
    archive.unpack(job["submission_tar"], submissions / submission)
    prefix = conda_env_prefix(job.get("conda_env"))
    bin_dir = prefix / "bin"
    ramp_test = bin_dir / "ramp-test"
    if not ramp_test.exists():
        raise FileNotFoundError(f"no ramp-test in {bin_dir} on Dask worker {worker.address}")
    argv = ramptest.command(submission, str(kit), str(data), str(submissions),
                            ramp_test=str(ramp_test))
    env = ramptest.child_environment(job.get("n_threads"), extra_path=str(bin_dir))
    log_path = scratch / "log"
    settings = job["settings"]
    mode = settings.sandbox
    works, why = sandbox.probe() if mode != "off" else (True, "")
    # Said to the dispatcher, which decides and warns (an exception would be a lost run).
    no_sandbox = None if works else why
    if no_sandbox is not None and mode == "required":
        return {"status": "no_sandbox", "no_sandbox": no_sandbox, "worker": worker.address,
                "log": b""}
    confinement = sandbox.confinement(
        settings, sandbox.use_sandbox(mode, f"Dask worker {worker.address}"),
        read_only=[kit, data], writable=[submissions / submission], tmp=scratch / "tmp")
    with _LOCK:
        if run_id in _KILLED:
            return {"status": "killed", "worker": worker.address, "log": b""}
        run = LocalRun(argv, env, log_path, cwd=scratch, confinement=confinement)
        _RUNS[run_id] = run
    try:
        status = _wait(run, float(settings.timeout), worker)
        run.stop()
        if status == "ended" and run_id in _KILLED:
            status = "killed"
        reason = run.stop_reason if status == "ended" else None
        if reason is not None and reason.get("fault") == "event":
            # The log holds bubblewrap's words only (nothing of the submission ran), and
            # it is not installed: its last line goes with the message.
            said = log_path.read_bytes()[-500:].decode(errors="replace").strip().splitlines()
            return {"status": "event_error", "no_sandbox": no_sandbox, "worker": worker.address,
                    "message": f"{reason.get('message')} ({(said or ['no output'])[-1]})"}
        stopped = reason.get("message") if reason is not None else None
        output = submissions / submission / "training_output"
        ok = status == "ended" and run.returncode == 0 and stopped is None \
            and output.is_dir() and not output.is_symlink()
        if ok:
            # Packing follows links: a link or a FIFO must be refused before, here.
            try:
                results.check_tree(output, settings.output_limit_mb * results.MIB)
            except SubmissionError as error:
                ok, stopped = False, str(error)
        return {
            "status": status,
            # Why the run is the submission's error though ramp-test may have exited 0:
            # a limit the supervisor enforced, or an unusable training_output.
            "stopped": stopped,
            "returncode": run.returncode,
            "log": log_path.read_bytes(),
            "output": archive.compress(archive.pack(output)) if ok else None,
            "peak_memory_mb": run.peak_memory_mb,
            "no_sandbox": no_sandbox,
            "worker": worker.address,
        }
    finally:
        with _LOCK:
            _RUNS.pop(run_id, None)
        run.stop()
        run.cleanup()


def _wait(run: LocalRun, timeout: float, worker: distributed.Worker) -> str:
    """Wait for ``run`` to end: ``ended``, or ``timeout``/``killed`` after stopping it."""
    key = worker.get_current_task()
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            run.stop()
            return "timeout"
        if run.wait(min(ABANDON_CHECK_SECONDS, remaining)):
            return "ended"
        if _abandoned(worker, key):
            run.stop()
            return "killed"


def _abandoned(worker: distributed.Worker, key: Any) -> bool:
    """Whether the scheduler no longer wants this task (cancelled, or its client is gone)."""
    state = worker.state.tasks.get(key)
    return state is None or state.state in ("cancelled", "released", "forgotten")
