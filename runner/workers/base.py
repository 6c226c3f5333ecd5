"""BaseWorker: the worker contract of RAMP's documentation, which custom workers subclass.

A subclass does its work in ``setup``, ``launch_submission``, ``collect_results`` and
``teardown`` and calls ``super()`` as the seed shows; the base keeps ``status`` and checks
that the calls come in order. ``wait`` and ``kill`` are this project's additions: the
dispatcher uses them so that a finished local run is noticed at once and a shutdown stops
every run; their defaults work for any seed-style worker.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from runner.config import DEFAULT_TIMEOUT

logger = logging.getLogger("runner.worker")

STATUSES = (
    "initialized",
    "setup",
    "running",
    "finished",
    "collected",
    "killed",
    "timeout",
    "retry",
    "error",
)


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

    def __init__(self, config: dict[str, Any], submission: str):
        self.config = config
        self.submission = submission
        self._status = "initialized"
        self._started_at: float | None = None
        self._wakeup = threading.Event()
        self._status_lock = threading.Lock()
        self.peak_memory_mb: float | None = None

    # -- status ---------------------------------------------------------------------------

    @property
    def status(self) -> str:
        """The worker's state; while running, reading it checks for the end of the run."""
        if self._status == "running":
            if self._is_submission_interrupted():
                self._advance("running", "retry")
            elif self._is_submission_finished():
                self._advance("running", "finished")
            else:
                self.check_timeout()
        return self._status

    @status.setter
    def status(self, value: str) -> None:
        if value not in STATUSES:
            raise ValueError(f"unknown worker status {value!r}; one of {', '.join(STATUSES)}")
        self._status = value

    @property
    def timeout(self) -> float:
        """Seconds a run may take before it is stopped."""
        return float(self.config.get("timeout") or DEFAULT_TIMEOUT)

    @property
    def elapsed(self) -> float:
        """Seconds since ``launch_submission`` (0 before it)."""
        return 0.0 if self._started_at is None else time.monotonic() - self._started_at

    def check_timeout(self) -> bool:
        """Return True (and set status ``timeout``) once the run is past ``timeout``."""
        if self._status == "timeout":
            return True
        if self.elapsed > self.timeout and self._advance("running", "timeout"):
            logger.info("%r ran past its timeout of %g s", self, self.timeout)
            return True
        return False

    def _advance(self, expected: str, target: str) -> bool:
        """Move from ``expected`` to ``target`` unless another thread moved first (kill)."""
        with self._status_lock:
            if self._status != expected:
                return False
            self._status = target
            return True

    def _is_submission_finished(self) -> bool:
        """Whether the launched run has ended (subclasses must say how to tell)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _is_submission_finished")

    def _is_submission_interrupted(self) -> bool:
        """Whether the run was lost through no fault of the submission (spot, SSH, Dask)."""
        return False

    # -- the contract ---------------------------------------------------------------------

    def setup(self) -> None:
        """Prepare the worker; subclasses do their work first, then call ``super().setup()``."""
        if self._status not in ("initialized", "setup"):
            raise ValueError(f"{self!r}: setup() called in status {self._status!r}")
        self._status = "setup"
        logger.info("%r set up", self)

    def launch_submission(self) -> None:
        """Start the run; subclasses start it, then call ``super().launch_submission()``."""
        if self._status in ("running", "finished", "timeout", "collected"):
            raise ValueError(
                f"{self!r}: the submission was already launched; collect its results first"
            )
        if self._status != "setup":
            raise ValueError(f"{self!r}: call setup() before launch_submission()")
        self._started_at = time.monotonic()
        self._status = "running"
        logger.info("%r launched", self)

    def collect_results(self) -> tuple[int, str]:
        """Check that there is something to collect; subclasses then write log and predictions.

        Subclasses return ``(returncode, error_msg)`` and set ``self.status = 'collected'``.
        """
        if self._status == "initialized":
            raise ValueError(
                f"{self!r}: nothing to collect; call setup() and launch_submission() first"
            )
        if self._status == "setup":
            raise ValueError(f"{self!r}: nothing to collect; call launch_submission() first")
        if self._status in ("collected", "killed"):
            raise ValueError(f"{self!r}: results were already collected")
        # As in RAMP, collecting a run that is still going waits for its end or timeout.
        self._wait_until_done()
        return 0, ""

    def teardown(self) -> None:
        """Release what the worker holds; subclasses clean up, then call ``super().teardown()``."""
        self._check_teardown_allowed()
        self._status = "killed"
        logger.info("%r torn down", self)

    def _check_teardown_allowed(self) -> None:
        """Raise ValueError while a run's results wait to be collected.

        Subclasses that release something call it first, so that misuse loses nothing.
        """
        if self._status in ("running", "finished", "timeout"):
            raise ValueError(f"{self!r}: collect_results() before teardown()")

    def launch(self) -> tuple[int, str]:
        """Run the whole contract in a row, for use without a dispatcher."""
        self.setup()
        try:
            self.launch_submission()
            self._wait_until_done()
            if self._status == "retry":
                self.kill()
                return 1, "the run was interrupted"
            return self.collect_results()
        finally:
            self.teardown()

    # -- dispatcher hooks -----------------------------------------------------------------

    def wait(self, timeout: float) -> None:
        """Block until the run may have ended, ``kill`` is called, or ``timeout`` passes.

        The default checks ``_is_submission_finished`` every ``time_between_collection``
        seconds; workers that can be told of the end (a process, a future) override it.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        interval = float(self.config.get("time_between_collection") or 1.0)
        while self.status == "running" and not self._wakeup.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.wait(min(interval, remaining))

    def _wait_until_done(self) -> None:
        while self.status == "running" and not self._wakeup.is_set():
            self.wait(self.timeout - self.elapsed + 0.1)

    def kill(self) -> None:
        """Mark the run stopped (dispatcher shutdown); subclasses call ``super().kill()``
        first, then stop the run, so that its end is never taken for a normal finish.

        Safe from another thread and in any status; the worker can then be torn down.
        """
        with self._status_lock:
            if self._status in ("running", "finished", "timeout", "retry"):
                self._status = "killed"
                logger.info("%r killed", self)
        self._wakeup.set()

    @classmethod
    def reap_leftovers(cls, config: dict[str, Any], dry_run: bool = False) -> list[str]:
        """Release what runs of this event left behind (a dead dispatcher's instances).

        Called by the dispatcher on start and by ``invoke reap``; returns what was (or,
        with ``dry_run``, would be) released. Workers holding nothing outside a run
        keep this default.
        """
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.submission}): status={self._status!r}"

    __str__ = __repr__
