"""Helpers for the Dask worker tests: events, odd submissions, processes of Dask workers."""

from __future__ import annotations

import io
import os
import tarfile
import threading
import time
from pathlib import Path

import psutil

from runner.config import load_event_config
from runner.dispatcher import Dispatcher
from runner.ledger import Ledger
from tests.events import env_prefix_like_this_one, install_fake_conda

REPO = Path(__file__).resolve().parents[2]
SECRET = "RR_TEST_SECRET_TOKEN"

# ramp-test refuses source naming process functions, hence the assembled names.
SLOW_CLASSIFIER = '''
import importlib

from sklearn.linear_model import LogisticRegression


class Classifier:
    def __init__(self):
        self.model = LogisticRegression(max_iter=200)

    def fit(self, X, y):
        getattr(importlib.import_module("time"), "sl" + "eep")(2)
        self.model.fit(X, y)
        return self

    def predict_proba(self, X):
        return self.model.predict_proba(X)
'''



def cluster_env(folder: Path) -> dict[str, str]:
    """The Dask workers' environment: ramp-runner importable (as after ``pip install``),
    a conda knowing ``ramp-iris``, and a secret (``SECRET``) the submissions must not see."""
    prefix = env_prefix_like_this_one(folder / "envs" / "ramp-iris")
    conda = install_fake_conda(folder / "conda-bin", {"ramp-iris": prefix})
    return {"PYTHONPATH": str(REPO), "PATH": f"{conda.parent}:{os.environ['PATH']}",
            SECRET: "must-not-leak"}


def drive(worker) -> threading.Thread:
    """Watch a launched worker from a thread, as a dispatcher slot does, until it stops running."""
    def watch():
        while worker.status == "running":
            worker.wait(max(0.0, worker.timeout - worker.elapsed) + 0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def add_submission(config_path: Path, name: str, source: str) -> None:
    """Add submission ``name`` with ``classifier.py`` = ``source`` to the event."""
    folder = config_path.parent / "submissions" / name
    folder.mkdir(parents=True)
    (folder / "classifier.py").write_text(source)


def dispatch(config_path: Path) -> dict:
    """Run the dispatcher until hunger_policy 'exit'; return the ledger rows by name."""
    config = load_event_config(config_path)
    Dispatcher(config).run()
    with Ledger(config.ledger_path) as ledger:
        return {row.name: row for row in ledger.all()}


def tar_with(members: dict[str, bytes | None], links: dict[str, str] | None = None) -> bytes:
    """A tar of files (``None``: a folder) and symbolic links, names taken as given."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()


def cached_files(pattern: str, dask_worker=None) -> list[str]:
    """Files matching ``pattern`` in a Dask worker's local directory (``Client.run`` passes
    ``dask_worker``)."""
    return [str(p) for p in Path(dask_worker.local_directory).glob(pattern)]


def worker_pids(client) -> dict[str, int]:
    """The pid of every Dask worker process, by address."""
    return client.run(os.getpid)


def descendants(pids) -> dict[int, list[int]]:
    """The living descendants of each of ``pids``."""
    found = {}
    for pid in pids:
        try:
            found[pid] = [p.pid for p in psutil.Process(pid).children(recursive=True)
                          if _alive(p)]
        except psutil.NoSuchProcess:
            found[pid] = []
    return found


def wait_for_run(pids, minimum: int = 3, timeout: float = 30.0) -> tuple[int, list[int]]:
    """Wait until one of the worker ``pids`` has at least ``minimum`` living descendants."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid, children in descendants(pids).items():
            if len(children) >= minimum:
                return pid, children
        time.sleep(0.1)
    raise AssertionError(f"no ramp-test run appeared under Dask workers {list(pids)}")


def living(pids, timeout: float = 0.0) -> list[int]:
    """Those of ``pids`` still alive (not zombies) after waiting up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if _alive_pid(pid)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def _alive_pid(pid: int) -> bool:
    try:
        return _alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def break_sandbox(folder: str, check_passes: bool = False, dask_worker=None) -> str:
    """Put a ``bwrap`` that fails as on a machine forbidding user namespaces first on this
    Dask worker's PATH (``Client.run``), and forget its earlier sandbox check; returns the
    PATH to give back to ``restore_sandbox``. With ``check_passes`` it runs the sandbox
    check's ``true`` and fails only the runs."""
    from runner import sandbox

    fake = Path(folder) / "bwrap"
    fake.parent.mkdir(parents=True, exist_ok=True)
    check = 'for last; do :; done; [ "$last" = true ] && exit 0\n' if check_passes else ""
    fake.write_text(f"#!/bin/sh\n{check}echo 'bwrap: setting up uid map: Permission denied' >&2"
                    "\nexit 1\n")
    fake.chmod(0o755)
    old = os.environ["PATH"]
    os.environ["PATH"] = f"{fake.parent}:{old}"
    sandbox.probe.cache_clear()
    return old


def restore_sandbox(paths: dict[str, str], dask_worker=None) -> None:
    """Undo ``break_sandbox`` on this Dask worker (``paths``: its answers, by address)."""
    from runner import sandbox

    os.environ["PATH"] = paths[dask_worker.address]
    sandbox.probe.cache_clear()
