"""BaseWorker: the worker contract of RAMP's documentation, which custom workers subclass.

A subclass does its work in ``setup``, ``launch_submission``, ``collect_results`` and
``teardown`` and calls ``super()`` as the seed shows; the base keeps ``status`` and checks
every change of it against one table (``TRANSITIONS``). ``wait`` and ``kill`` are this
project's additions: the dispatcher uses them so that a finished local run is noticed at
once and a shutdown stops every run; their defaults work for any seed-style worker.

The built-in workers write only ``setup`` and the run's execution interface, as each
provider of dask-cloudprovider implements its ``VMInterface``: ``start_run``, ``poll_run``,
``stop_run``, ``fetch_run`` (-> ``RunArtifacts``) and ``release_run``. The base owns the
rest of the lifecycle once: launch, the checks of a running run, collect (log, error
message and predictions installed by ``runner.results``), kill and teardown.

Custom workers import ``BaseWorker`` from here (``runner.worker``): that path is stable.
"""

from __future__ import annotations

import enum
import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner import gpus, rescoring
from runner.blinded import BlindedData
from runner.config import PATH_KEYS, CustomWorkerSection, WorkerSection, worker_settings
from runner.errors import ConfigError, EventError
from runner.registry import worker_class
from runner.results import RunEnd, install_run
from runner.scratch import remove_tree
from runner.training_output import RunResults

__all__ = ["BaseWorker", "ContractError", "RunArtifacts", "RunState", "WorkerStatus",
           "worker_class"]

logger = logging.getLogger("runner.worker")


class WorkerStatus(enum.StrEnum):
    """Where a worker is in its contract; compares equal to RAMP's status strings."""

    INITIALIZED = "initialized"
    SETUP = "setup"
    RUNNING = "running"
    FINISHED = "finished"
    TIMEOUT = "timeout"
    RETRY = "retry"
    COLLECTED = "collected"
    ERROR = "error"
    KILLED = "killed"


S = WorkerStatus
TRANSITIONS: dict[WorkerStatus, frozenset[WorkerStatus]] = {
    S.INITIALIZED: frozenset({S.SETUP, S.ERROR, S.KILLED}),
    S.SETUP: frozenset({S.SETUP, S.RUNNING, S.ERROR, S.KILLED}),
    S.RUNNING: frozenset({S.FINISHED, S.TIMEOUT, S.RETRY, S.ERROR, S.KILLED}),
    S.FINISHED: frozenset({S.COLLECTED, S.ERROR, S.KILLED}),
    S.TIMEOUT: frozenset({S.COLLECTED, S.ERROR, S.KILLED}),
    S.RETRY: frozenset({S.ERROR, S.KILLED}),
    S.COLLECTED: frozenset({S.KILLED}),
    S.ERROR: frozenset({S.KILLED}),
    S.KILLED: frozenset({S.KILLED}),
}
# A run whose results were not collected yet: tearing it down would lose them.
UNCOLLECTED = frozenset({S.RUNNING, S.FINISHED, S.TIMEOUT})


class RunState(enum.StrEnum):
    """Where a launched run is, as its worker's ``poll_run`` sees it."""

    RUNNING = "running"
    ENDED = "ended"
    # Lost through no fault of the submission (spot reclaim, lost host or Dask worker).
    LOST = "lost"


@dataclass(frozen=True)
class RunArtifacts:
    """What a run left, brought to this machine by its worker's ``fetch_run``."""

    log: Path
    # The run's training_output; None when it left none to bring back.
    output: Path | None
    end: RunEnd
    peak_memory_mb: float | None = None


class ContractError(ValueError):
    """The worker's methods were called out of order (RAMP raises ValueError too)."""


class BaseWorker:
    """Run one submission: ``setup -> launch_submission -> collect_results -> teardown``.

    Parameters
    ----------
    config : dict
        The event's ``worker`` section, with ``kit_dir``, ``data_dir``,
        ``submissions_dir``, ``logs_dir`` and ``predictions_dir`` filled in.
    submission : str
        The name of the submission folder in ``submissions_dir``.
    """

    # The dataclass that validates this worker type's section (see runner.config);
    # third-party workers keep this one, which lets their own keys through.
    settings_class: type[WorkerSection] = CustomWorkerSection
    # Seconds between two checks of a run when the event sets no time_between_collection.
    default_poll_seconds = 1.0
    # Whether the worker can run the ingestion program instead of ramp-test, so that the
    # test labels stay out of the run (runner.blinded): built-in workers can; a custom
    # worker runs ramp-test itself.
    runs_ingestion = False

    def __init__(self, config: dict[str, Any], submission: str):
        self.config = config
        self.submission = submission
        self._status = S.INITIALIZED
        self._started_at: float | None = None
        self._wakeup = threading.Event()
        self._status_lock = threading.Lock()
        self._scratch: Path | None = None
        self._settings: WorkerSection | None = None
        self.peak_memory_mb: float | None = None
        # The results as read and checked while collecting (runner.results), so that the
        # dispatcher does not read them again; None for workers that install their own.
        self.verified_results: RunResults | None = None
        # Why a check of the run failed (the status is then ``retry``).
        self.interruption: str | None = None
        # Whether the run is confined out of the dispatcher's reach (set at setup): a
        # dispatcher that dies while it runs is then not the run's doing, and costs it no
        # attempt. Unknown (a custom worker) counts as not confined.
        self.sandboxed = False

    @property
    def hidden_labels(self) -> BlindedData | None:
        """The blinded data the dispatcher prepared (``runner.blinded``), when the run is to
        predict without the test labels; None when it runs ramp-test."""
        if not self.runs_ingestion:
            return None
        return self.settings.dispatch.prepared.get("blinded")

    @classmethod
    def settings_of(cls, config: dict[str, Any]) -> WorkerSection:
        """The validated settings of a worker dict (see ``runner.config.worker_settings``)."""
        return worker_settings(cls.settings_class, config, f"{cls.__name__} config")

    @property
    def settings(self) -> WorkerSection:
        """This worker's typed settings: its config dict validated (``settings_of``) when
        first needed, and again by ``read_config`` at setup; what the dispatcher filled in
        (``n_threads``, ``scratch_dir``, ``prepared``...) is ``settings.dispatch``."""
        if self._settings is None:
            self._settings = self.settings_of(self.config)
        return self._settings

    def read_config(self, *required: str) -> WorkerSection:
        """At setup, as RAMP's workers do: check that ``required`` keys (default: the five
        paths) are in the config dict, then take the dict as it is now as the settings
        (RAMP's callers may change it between making the worker and setting it up)."""
        self.require_keys(*required)
        self._settings = None
        return self.settings

    # -- status ---------------------------------------------------------------------------

    @property
    def status(self) -> WorkerStatus:
        """The worker's state; while running, reading it checks for the end of the run.

        A check that fails (a poll that raises) is the infrastructure's fault: the status
        becomes ``retry`` and ``interruption`` says why.
        """
        if self._status is S.RUNNING:
            try:
                state = self.poll_run()
                if state is RunState.LOST:
                    self._advance(S.RUNNING, S.RETRY)
                elif state is RunState.ENDED:
                    self._advance(S.RUNNING, S.FINISHED)
                else:
                    self.check_timeout()
            except Exception as error:  # noqa: BLE001 - any failed check is a lost run
                logger.warning("%r: checking the run failed: %s", self, error)
                self.interruption = f"checking the run failed: {type(error).__name__}: {error}"
                self._advance(S.RUNNING, S.RETRY)
        return self._status

    @property
    def known_status(self) -> WorkerStatus:
        """The status as last seen, without checking the run (cheap, for displays)."""
        return self._status

    @status.setter
    def status(self, value: str) -> None:
        try:
            target = WorkerStatus(value)
        except ValueError:
            raise ValueError(f"unknown worker status {value!r}; one of "
                             f"{', '.join(WorkerStatus)}") from None
        with self._status_lock:
            self._move(target)

    def _move(self, target: WorkerStatus) -> None:
        """Change the status, refusing what the table does not allow (lock held)."""
        if target not in TRANSITIONS[self._status]:
            raise ContractError(f"{self!r}: cannot go from {self._status} to {target}")
        self._status = target

    def _advance(self, expected: WorkerStatus, target: WorkerStatus) -> bool:
        """Move from ``expected`` to ``target`` unless another thread moved first (kill)."""
        with self._status_lock:
            if self._status is not expected:
                return False
            self._move(target)
            return True

    @property
    def timeout(self) -> float:
        """Seconds a run may take before it is stopped."""
        return float(self.settings.timeout)

    @property
    def poll_seconds(self) -> float:
        """The most often the run is checked: ``time_between_collection`` or the default."""
        configured = self.settings.dispatch.time_between_collection
        return self.default_poll_seconds if configured is None else float(configured)

    @property
    def elapsed(self) -> float:
        """Seconds since ``launch_submission`` (0 before it)."""
        return 0.0 if self._started_at is None else time.monotonic() - self._started_at

    def check_timeout(self) -> bool:
        """Return True (and set status ``timeout``) once the run is past ``timeout``."""
        if self._status is S.TIMEOUT:
            return True
        if self.elapsed > self.timeout and self._advance(S.RUNNING, S.TIMEOUT):
            logger.info("%r ran past its timeout of %g s", self, self.timeout)
            return True
        return False

    def _is_submission_finished(self) -> bool:
        """Whether the launched run has ended (seed-style workers must say how to tell)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _is_submission_finished")

    def _is_submission_interrupted(self) -> bool:
        """Whether the run was lost through no fault of the submission (spot, SSH, Dask)."""
        return False

    # -- the run's execution interface: what each built-in worker implements ----------------

    def start_run(self) -> None:
        """Start the run that ``setup`` prepared. Seed-style workers keep this default and
        start theirs in ``launch_submission`` before calling ``super()``."""

    def poll_run(self) -> RunState:
        """Where the launched run is; an exception is taken for a lost run. The default
        asks the seed's hooks, ``_is_submission_interrupted`` then ``_is_submission_finished``."""
        if self._is_submission_interrupted():
            return RunState.LOST
        if self._is_submission_finished():
            return RunState.ENDED
        return RunState.RUNNING

    def stop_run(self) -> None:
        """Stop what is left of the run at once (``kill``), keeping nothing; safe to call
        again and when nothing runs."""

    def fetch_run(self, timed_out: bool) -> RunArtifacts | None:
        """End what is left of the run (``timed_out``: it ran past ``timeout``) and bring
        what it left to this machine. None (the default): the worker writes the log and
        predictions itself after ``super().collect_results()``, as the seed shows."""
        return None

    def release_run(self) -> None:
        """Release what ``setup`` took (a host, an instance, a connection), whatever
        happened before; called by ``teardown``."""

    def require_keys(self, *keys: str) -> None:
        """Raise EventError naming the first of ``keys`` the config dict lacks (checked at
        setup, as RAMP's workers do: the dict may have changed since the worker was made)."""
        for key in keys or PATH_KEYS:
            if not self.config.get(key):
                raise EventError(f"The worker required the parameter '{key}' in the "
                                 f"configuration file (worker.{key} of the event config)")

    def submission_folder(self) -> Path:
        """The submission's folder in ``submissions_dir``; EventError when it is not there."""
        folder = Path(self.settings.submissions_dir) / self.submission
        if not folder.is_dir():
            raise EventError(f"submission folder {folder} does not exist")
        return folder

    @property
    def scratch(self) -> Path:
        """A private folder on this machine for the run's files, removed by ``teardown``.

        It lives under the worker key ``scratch_dir`` (the dispatcher's, reaped at its
        start), else under the system's temporary folder.
        """
        if self._scratch is None:
            parent = self.settings.dispatch.scratch_dir
            if parent:
                Path(parent).mkdir(parents=True, exist_ok=True)
            self._scratch = Path(tempfile.mkdtemp(prefix=f"ramp-{self.submission}-",
                                                  dir=parent))
        return self._scratch

    # -- the contract ---------------------------------------------------------------------

    def setup(self) -> None:
        """Prepare the worker; subclasses do their work first, then call ``super().setup()``."""
        if self._status not in (S.INITIALIZED, S.SETUP):
            raise ContractError(f"{self!r}: setup() called in status {self._status!r}")
        self.status = S.SETUP
        logger.debug("%r set up", self)

    def launch_submission(self) -> None:
        """Start the run (``start_run``); seed-style subclasses start it themselves, then
        call ``super().launch_submission()``."""
        if self._status in (*UNCOLLECTED, S.COLLECTED):
            raise ContractError(
                f"{self!r}: the submission was already launched; collect its results first "
                "(Wait that the submission is processed before to launch a new one)"
            )
        if self._status is not S.SETUP:
            raise ContractError(f"{self!r}: call setup() before launch_submission()")
        self.start_run()
        self._started_at = time.monotonic()
        self.status = S.RUNNING
        logger.debug("%r launched", self)

    def collect_results(self) -> tuple[int, str]:
        """Collect the run: its log, error message and, on success, its predictions.

        What ``fetch_run`` brings back is installed (``runner.results``) and the worker is
        ``collected``; if that fails, the worker is in ``error``, from which ``teardown``
        releases everything. A seed-style worker (``fetch_run`` gives None) writes them
        itself after this call, returns ``(returncode, error_msg)`` and sets
        ``self.status = 'collected'``.
        """
        if self._status is S.INITIALIZED:
            raise ContractError(
                f"{self!r}: nothing to collect; call setup() and launch_submission() first "
                "(Call the method setup() and launch_submission() before to collect the results)"
            )
        if self._status is S.SETUP:
            raise ContractError(
                f"{self!r}: nothing to collect; call launch_submission() first "
                "(Call the method launch_submission() and then try again to collect the results)"
            )
        if self._status in (S.COLLECTED, S.KILLED):
            raise ContractError(f"{self!r}: results were already collected")
        # As in RAMP, collecting a run that is still going waits for its end or timeout.
        self._wait_until_done()
        try:
            artifacts = self.fetch_run(timed_out=self._status is S.TIMEOUT)
            if artifacts is None:
                return 0, ""
            self.peak_memory_mb = artifacts.peak_memory_mb
            returncode, error_msg, self.verified_results = install_run(
                self.settings, self.submission, artifacts.end, artifacts.log, artifacts.output,
                self.hidden_labels)
        except BaseException:
            with self._status_lock:
                if self._status in UNCOLLECTED:
                    self._move(S.ERROR)
            raise
        self.status = S.COLLECTED
        logger.debug("%r collected: returncode %s", self, returncode)
        return returncode, error_msg

    def teardown(self) -> None:
        """Release what the worker holds (``release_run``, then the scratch folder);
        seed-style subclasses clean up, then call ``super().teardown()``.

        Refused (before anything is touched) while results wait to be collected; in every
        other status, including after a failed ``collect_results``, it releases.
        """
        if self._status in UNCOLLECTED:
            raise ContractError(f"{self!r}: collect_results() before teardown()")
        self.release_run()
        if self._scratch is not None:
            remove_tree(self._scratch)
        self.status = S.KILLED
        logger.debug("%r torn down", self)

    def launch(self) -> tuple[int, str]:
        """Run the whole contract in a row, for use without a dispatcher."""
        self.setup()
        try:
            self.launch_submission()
            self._wait_until_done()
            if self._status is S.RETRY:
                return 1, self.interruption or "the run was interrupted"
            return self.collect_results()
        finally:
            self.kill()
            self.teardown()

    # -- dispatcher hooks -----------------------------------------------------------------

    def wait(self, timeout: float) -> None:
        """Block until the run may have ended, ``kill`` is called, or ``timeout`` passes.

        The default checks the run (``poll_run``) every ``time_between_collection``
        seconds; workers that can be told of the end (a process, a future) override it.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        interval = self.poll_seconds
        while self.status is S.RUNNING and not self._wakeup.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.wait(min(interval, remaining))

    def _wait_until_done(self) -> None:
        while self.status is S.RUNNING and not self._wakeup.is_set():
            self.wait(self.timeout - self.elapsed + 0.1)

    def kill(self) -> None:
        """Mark a launched run stopped, then stop it (``stop_run``): its end is never taken
        for a normal finish.

        Safe from another thread and in any status; the worker can then be torn down.
        """
        with self._status_lock:
            if self._status in (*UNCOLLECTED, S.RETRY):
                self._move(S.KILLED)
                logger.debug("%r killed", self)
        self._wakeup.set()
        self.stop_run()

    @classmethod
    def preflight(cls, config: dict[str, Any]) -> list[str]:
        """Check, before any submission runs, what this worker type needs of the machine
        and the event (a scheduler that answers, a key file only its owner reads); raise
        EventError naming the key and what was expected, and return the warnings to show
        once. Workers with nothing to check keep this default."""
        return []

    @classmethod
    def check_event_files(cls, config: dict[str, Any]) -> None:
        """Check, before any submission runs, the kit and data that runs read from this
        machine (``check_kit_dir``, ``check_data_dir``); raise ConfigError naming the key.
        A worker type whose runs find them elsewhere checks only what they read here."""
        settings, source = cls.settings_of(config), cls.config_source(config)
        check_kit_dir(source, settings.kit_dir)
        check_data_dir(source, settings.data_dir)

    @classmethod
    def gpu_hosts(cls, config: dict[str, Any]) -> list[gpus.HostGPUs] | None:
        """The GPUs of each host this worker type's runs take them on (``check-config``
        fits the slots into them), or None where the dispatcher cannot list them."""
        return None

    @classmethod
    def config_source(cls, config: dict[str, Any]) -> str:
        """What an error about ``config`` names as its source: the event's config file
        (``event_config``, filled in by the dispatcher), else this worker type's config."""
        return config.get("event_config") or f"{cls.__name__} config"

    @classmethod
    def prepare(cls, config: dict[str, Any]) -> dict[str, Any]:
        """What every run of one dispatcher can share, found once when it starts (a conda
        environment's prefix); the dispatcher hands it to each worker as
        ``config['prepared']``. Workers with nothing to share keep this default."""
        return {}

    @classmethod
    def close_shared(cls, config: dict[str, Any]) -> None:
        """Release what runs of one dispatcher kept for the next ones (warm instances),
        once its last run is torn down. Workers that keep nothing between runs keep this."""

    @classmethod
    def warm_up(cls, config: dict[str, Any]) -> None:
        """Load what collecting will need, in a thread of its own while the first runs go:
        by default the kit's scoring code, with which ``runner.results`` re-scores each
        run. A worker that installs its results some other way overrides it."""
        settings = cls.settings_of(config)
        rescoring.warm(settings.kit_dir, settings.data_dir)

    @classmethod
    def reap_leftovers(cls, config: dict[str, Any], dry_run: bool = False) -> list[str]:
        """Release what runs of this event left behind (a dead dispatcher's instances).

        Called by the dispatcher on start and by ``reap``; returns what was (or, with
        ``dry_run``, would be) released. Workers holding nothing outside a run keep this.
        """
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.submission}): status={self._status.value!r}"

    __str__ = __repr__


def check_kit_dir(source: str, kit_dir: str) -> None:
    """Raise ConfigError unless ``kit_dir`` is a folder holding the kit's problem.py."""
    kit = Path(kit_dir)
    if not kit.is_dir():
        raise ConfigError(source, "worker.kit_dir", "the kit's folder", f"{kit} (no such folder)")
    if not (kit / "problem.py").is_file():
        raise ConfigError(source, "worker.kit_dir", "a kit folder holding problem.py",
                          f"{kit} (no problem.py)")


def check_data_dir(source: str, data_dir: str) -> None:
    """Raise ConfigError unless ``data_dir`` holds data/ or the prepare_data.py making it."""
    data = Path(data_dir)
    if not data.is_dir():
        raise ConfigError(source, "worker.data_dir", "the data folder",
                          f"{data} (no such folder)")
    if not (data / "data").is_dir() and not (data / "prepare_data.py").is_file():
        raise ConfigError(source, "worker.data_dir", "a folder holding data/ or prepare_data.py",
                          f"{data} (neither)")

