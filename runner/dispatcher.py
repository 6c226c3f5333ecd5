"""The dispatcher: claim -> setup/launch -> watch -> collect -> record -> teardown.

Each claimed submission runs in its own thread (a *slot*), so a slow setup such as an EC2
boot never holds up the others. The main thread only discovers and claims submissions,
and sleeps on a queue that slots, signals and timers wake: it never spins.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import os
import queue
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack, suppress
from functools import partial
from pathlib import Path

from runner import blinded, livelog, training_output
from runner.config import EventConfig
from runner.errors import ConfigError, EventError, LedgerError, RunnerError, SubmissionError
from runner.eventlock import DispatcherBusy
from runner.ledger import Ledger
from runner.scratch import remove_tree
from runner.signals import stop_on_signals
from runner.source import FolderSource, SubmissionSource
from runner.states import SubmissionState
from runner.submissions import worker_view
from runner.worker import BaseWorker, WorkerStatus, worker_class

logger = logging.getLogger("runner.dispatcher")

# How often an idle dispatcher looks for new submission folders; the seed's ``sleep``
# policy waits 5 s, and ``None`` (run forever) rescans at this pace instead of spinning.
IDLE_RESCAN_SECONDS = 2.0
SLEEP_POLICY_SECONDS = 5.0
# A slot is given this long to tear its worker down after a shutdown signal.
SHUTDOWN_GRACE_SECONDS = 120.0
# What a source's watch puts on the wake-up queue (slots put their submission's name).
ARRIVAL = "arrival"


# Errors of the event's own disks and folders: no run can be recorded while they last.
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
# Of those, the ones a file the submission wrote could also raise (an unreadable file in
# its output): the machine's only when they name a file of the event's own folders.
PATH_ERRNOS = frozenset({errno.EACCES, errno.EPERM})

__all__ = ["Dispatcher", "DispatcherBusy", "MachineFault", "prepare_data"]


class MachineFault(RunnerError, RuntimeError):
    """The event's disks or folders failed (full, read-only, not writable): the dispatcher
    stopped, since no further run could be recorded either."""


def prepare_data(data_dir: str | Path) -> bool:
    """Run ``prepare_data.py`` in ``data_dir`` when its ``data/`` is missing (RAMP's layout).

    Returns whether it ran; a failing script raises RuntimeError with its output.
    """
    data_dir = Path(data_dir)
    script = data_dir / "prepare_data.py"
    if (data_dir / "data").exists() or not script.exists():
        return False
    logger.info("preparing the data: %s", script)
    completed = subprocess.run([sys.executable, script.name], cwd=data_dir,
                               capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{script} failed:\n{completed.stdout}{completed.stderr}")
    return True


class Dispatcher:
    """Run the event's submissions with its worker type until the hunger policy says stop.

    ``on_change(name, state)`` is called after each recorded state change (for displays).
    ``source`` is where submissions come from: the event's ledger and submissions folder
    unless another is given (a RAMP board's database).
    """

    def __init__(self, config: EventConfig, on_change: Callable[[str, str], None] | None = None,
                 source: SubmissionSource | None = None):
        self.config = config
        if (getattr(config.worker, "budget_usd", None) is not None and source is not None
                and not isinstance(source, Ledger)):
            # Costs are kept in the event's ledger, which a RAMP board's dispatch does not use.
            raise ConfigError(str(config.path), "worker.budget_usd",
                              "no budget when the submissions come from a RAMP board (their "
                              "cost is not kept, so the budget could not be enforced)")
        self.source: SubmissionSource = source or FolderSource(config)
        self.worker_class: type[BaseWorker] = worker_class(config.worker.worker_type)
        self.dispatcher_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._on_change = on_change or (lambda name, state: None)
        self._wakeups: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._stopping = threading.Event()
        # Keyed by run, not by name: a retried submission's next run may start while its
        # last run's slot is still ending.
        self._slots: dict[int, tuple[str, threading.Thread, BaseWorker | None]] = {}
        self._run_numbers = itertools.count()
        # Slots whose run has ended: they collect, score and tear down, and no longer count
        # against n_workers, so the next submission starts without waiting for them.
        self._collecting: set[int] = set()
        # Run -> its slot number (0 to n_workers - 1) while it runs: a slot number keeps
        # its GPUs (runner.gpus) for every run it takes.
        self._slot_numbers: dict[int, int] = {}
        self._slots_lock = threading.Lock()
        # The worker dict with what the worker class found once for all runs
        # (worker.prepare), made at start and copied for each run.
        self._run_config: dict = {}
        self._warmed = False
        # What stops the dispatcher from a slot's thread (a ledger gone, a full disk).
        self._fatal: Exception | None = None
        # The dispatcher's own scratch space, beside the ledger: every run's scratch folder
        # and the Dask pack cache live under it, and it is emptied at each start.
        self.scratch_dir = Path(f"{config.ledger_path}.scratch")
        # What the event's instances cost so far (the ledger's sum, then each teardown's).
        self._spent_usd = 0.0
        self._budget_said = False

    # -- public -------------------------------------------------------------------------

    def run(self) -> None:
        """Dispatch until the hunger policy ends it or SIGINT/SIGTERM arrives.

        Raises MachineFault (a disk full or a folder not writable) or LedgerError (the
        ledger unusable, deleted or replaced) after stopping every run.
        """
        with ExitStack() as stack:
            stack.enter_context(self.source.opened())
            stack.enter_context(stop_on_signals(self.stop))
            self._reap_scratch()
            prepare_data(self.config.worker.data_dir)
            if isinstance(self.source, Ledger):
                self._spent_usd = sum(s.cost_usd or 0.0 for s in self.source.all())
            recovered = self.source.recover_abandoned()
            if recovered:
                logger.warning("back from a dead dispatcher: %s",
                               ", ".join(recovered))
            reaped = self.worker_class.reap_leftovers(self._worker_dict())
            if reaped:
                logger.warning("released what earlier runs left: %s", ", ".join(reaped))
            prepared = self.worker_class.prepare(self._worker_dict())
            hidden = blinded.for_event(self.config.worker, self.worker_class.runs_ingestion,
                                       f"{self.config.ledger_path}.blinded")
            if hidden is not None:
                prepared = {**prepared, "blinded": hidden}
            self._run_config = self._worker_dict(prepared)
            watch = self.source.watch(lambda: self._wakeups.put(ARRIVAL))
            if watch is not None:  # sources without one are rescanned every few seconds
                stack.enter_context(watch)
            try:
                self._loop(watched=watch is not None)
            finally:
                self._shutdown()
            if self._fatal is not None:
                raise self._fatal

    def _reap_scratch(self) -> None:
        """Empty the scratch space: what is there was left by a dead dispatcher (the lock
        is held, so no other dispatcher of this ledger uses it)."""
        if not self.scratch_dir.is_dir():
            return
        left = list(self.scratch_dir.iterdir())
        for path in left:
            # Iterative, unmounting a run's disk, and never raising on what a run shaped.
            remove_tree(path)
        if left:
            logger.warning("removed %d scratch folder(s) left by a dead dispatcher in %s",
                           len(left), self.scratch_dir)

    def running(self) -> list[tuple[str, str, float, float]]:
        """``(submission, worker status, elapsed s, timeout s)`` of every busy slot."""
        with self._slots_lock:
            workers = [(name, worker) for name, _, worker in self._slots.values()]
        return [(name, "starting", 0.0, 0.0) if worker is None else
                (name, worker.known_status.value, worker.elapsed, worker.timeout)
                for name, worker in workers]

    def stop(self) -> None:
        """Ask the dispatcher to stop claiming and tear every running worker down."""
        self._stopping.set()
        self._wakeups.put("stop")

    # -- main loop ----------------------------------------------------------------------

    def _loop(self, watched: bool) -> None:
        policy = self.config.dispatcher.hunger_policy
        reason: str | None = ARRIVAL
        last_intake = -math.inf
        while not self._stopping.is_set() and self._fatal is None:
            # A watched source is looked at when the watch saw an arrival, not at each
            # slot's wake-up; and every rescan period anyway, should the watch miss one.
            now = time.monotonic()
            if not watched or reason in (ARRIVAL, None) or now - last_intake >= IDLE_RESCAN_SECONDS:
                self.source.intake()
                last_intake = now
            self._fill_slots()
            busy = self._busy_slots()
            if not busy and (self.source.count_new() == 0 or self._over_budget()):
                if policy == "exit":
                    logger.info("no submission left to run: exiting (hunger_policy: exit)")
                    return
                wait = SLEEP_POLICY_SECONDS if policy == "sleep" else IDLE_RESCAN_SECONDS
            else:
                wait = IDLE_RESCAN_SECONDS
            try:
                reason = self._wakeups.get(timeout=wait)
            except queue.Empty:
                reason = None

    def _busy_slots(self) -> int:
        with self._slots_lock:
            return len(self._slots)

    def _fill_slots(self) -> None:
        with self._slots_lock:
            running = len(self._slots) - len(self._collecting)
            # Under a budget, what an ended run cost counts before the next launch.
            costing = bool(self._collecting) and self._budget() is not None
        free = self.config.dispatcher.slots - running
        if costing or self._over_budget():
            return
        for name in self.source.claim(free, worker=self.dispatcher_id):
            self._changed(name, SubmissionState.SENT_TO_TRAINING)
            run = next(self._run_numbers)
            with self._slots_lock:
                taken = set(self._slot_numbers.values())
                slot = min(set(range(self.config.dispatcher.slots)) - taken)
                self._slot_numbers[run] = slot
            thread = threading.Thread(target=self._run_slot, args=(run, name, slot),
                                      name=f"slot-{name}", daemon=True)
            with self._slots_lock:
                self._slots[run] = (name, thread, None)
            thread.start()

    # -- one submission -----------------------------------------------------------------

    def _run_slot(self, run: int, name: str, slot: int) -> None:
        worker: BaseWorker | None = None
        # Putting the submission back in the queue waits for the teardown, so that its next
        # run never meets what this one still holds (a host, a remote folder, an instance).
        requeue: Callable[[], None] | None = None
        try:
            self._clear_previous(name)
            # A copy each, with the slot's number: a worker may change its dict. A team's
            # submission is given its team's folders and its own name.
            worker = self.worker_class(*worker_view(self._run_config.for_run(slot=slot), name))
            with self._slots_lock:
                self._slots[run] = (name, self._slots[run][1], worker)
            requeue = self._run_worker(run, name, worker)
        except Exception as error:
            if worker is not None:
                worker.kill()  # whatever failed, the run must not outlive its slot
            try:
                requeue = self._failed(name, error)
            except LedgerError as fatal:
                self._stop_for(fatal)
        finally:
            if worker is not None:
                try:
                    worker.teardown()
                except Exception:
                    logger.exception("%s: teardown failed", name)
                self._record_usage(name, worker)
            try:
                if requeue is not None:
                    requeue()
            except LedgerError as fatal:
                self._stop_for(fatal)
            finally:
                with self._slots_lock:
                    self._slots.pop(run, None)
                    self._collecting.discard(run)
                    self._slot_numbers.pop(run, None)
                self._wakeups.put(name)

    def _clear_previous(self, name: str) -> None:
        """Remove what an earlier run of ``name`` left (a re-run, a retry): the log and
        predictions in place must always be those of the state the ledger gives."""
        predictions = os.path.join(self.config.worker.predictions_dir, name)
        try:
            mode = os.lstat(predictions).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None and stat.S_ISDIR(mode):
            shutil.rmtree(predictions)
        elif mode is not None:
            os.unlink(predictions)
        with suppress(FileNotFoundError):
            os.unlink(os.path.join(self.config.worker.logs_dir, name, "log"))

    def _stop_for(self, error: Exception) -> None:
        """Stop the dispatcher because of ``error`` (raised by ``run`` once all stopped)."""
        if self._fatal is None:
            self._fatal = error
            logger.error("%s", error)
        self.stop()

    def _run_worker(self, run: int, name: str, worker: BaseWorker) -> Callable[[], None] | None:
        """Run ``name`` on ``worker`` and record its result; returns how to put it back in
        the queue after the teardown, when it goes back."""
        worker.setup()
        if self._stopping.is_set():
            return partial(self._release, name)
        self._record(name, SubmissionState.TRAINING, self.source.mark_training, name,
                     worker.sandboxed)
        worker.launch_submission()
        self._warm_up_once()
        while (status := worker.status) is WorkerStatus.RUNNING:
            if self._stopping.is_set():
                # The shutdown's kill came while the run was starting, before it could stop it.
                worker.kill()
                continue
            # Wakes at the run's end (event-driven workers) or after one poll interval, to
            # notice a submission someone else stopped or re-queued meanwhile.
            worker.wait(min(worker.poll_seconds, max(0.0, worker.timeout - worker.elapsed))
                        + 0.05)
            if not self.source.still_claimed(name, self.dispatcher_id):
                worker.kill()
                logger.warning("%s: its state was changed by someone else: run stopped", name)
                return None
        with self._slots_lock:
            self._collecting.add(run)
            self._slot_numbers.pop(run, None)
        self._wakeups.put(name)  # its slot is free for the next submission
        if status is WorkerStatus.KILLED:
            return partial(self._release, name)
        if status is WorkerStatus.RETRY:
            worker.kill()
            return partial(self._retry, name, worker.interruption
                           or "the run was interrupted (spot reclaim, lost host or worker)")
        self._collect(name, worker)
        return None

    def _warm_up_once(self) -> None:
        """Once a first run is going, load what collecting needs (worker.warm_up) beside it,
        rather than on the first collection."""
        with self._slots_lock:
            if self._warmed:
                return
            self._warmed = True
        threading.Thread(target=self.worker_class.warm_up, args=(self._run_config,),
                         name="warm-up", daemon=True).start()

    def _failed(self, name: str, error: Exception) -> Callable[[], None] | None:
        """Record what a failure means: who is at fault decides the state (runner.errors);
        returns how to put it back in the queue after the teardown, when it goes back."""
        message = f"{type(error).__name__}: {error}"
        if isinstance(error, LedgerError):
            self._stop_for(error)  # nothing can be recorded
        elif (cause := self._machine_fault(error)) is not None:
            # Not the submission's fault, and not a lost run: every run would fail the same.
            message = (f"the event's files could not be written (not the submission's "
                       f"fault): {cause}")
            self._record(name, SubmissionState.CHECKING_ERROR, self.source.mark_checking_error,
                         name, message)
            self._stop_for(MachineFault(f"{cause}; stopped: fix it and dispatch again"))
        elif isinstance(error, SubmissionError):
            self._record(name, SubmissionState.TRAINING_ERROR, self.source.mark_training_error,
                         name, str(error), None, None)
        elif isinstance(error, EventError):
            self._record(name, SubmissionState.CHECKING_ERROR, self.source.mark_checking_error,
                         name, message)
        elif self._stopping.is_set():  # a shutdown interrupted it: not an attempt
            return partial(self._release, name)
        else:
            logger.warning("%s: %s", name, message, exc_info=logger.isEnabledFor(logging.DEBUG))
            return partial(self._retry, name, message)
        return None

    def _collect(self, name: str, worker: BaseWorker) -> None:
        run_time = worker.elapsed
        try:
            returncode, error_msg = worker.collect_results()
        except SubmissionError as error:  # refused results: the run's time and memory count
            self._record(name, SubmissionState.TRAINING_ERROR, self.source.mark_training_error,
                         name, str(error), run_time, getattr(worker, "peak_memory_mb", None))
            return
        peak = getattr(worker, "peak_memory_mb", None)
        if returncode != 0:
            self._record(name, SubmissionState.TRAINING_ERROR, self.source.mark_training_error,
                         name, error_msg or f"ramp-test exited with {returncode}", run_time,
                         peak)
            return
        output = Path(self.config.worker.predictions_dir) / name
        try:
            results = worker.verified_results or training_output.read_results(output)
        except (SubmissionError, ValueError) as error:
            # What ramp-test left was written where the submission's code ran: unreadable
            # results are the submission's fault, not a reason to run it again.
            self._record(name, SubmissionState.TRAINING_ERROR, self.source.mark_training_error,
                         name, f"unusable results: {error}", run_time, peak)
            return
        self.source.record_run(name, run_time, peak, results, output)
        self._changed(name, SubmissionState.TESTED)
        self._changed(name, SubmissionState.SCORED)

    def _machine_fault(self, error: BaseException) -> str | None:
        """The real cause when ``error`` is a fault of the event's disks or folders."""
        worker = self.config.worker
        own = [Path(worker.logs_dir), Path(worker.predictions_dir), self.scratch_dir]

        def ours(path: object) -> bool:
            return path is not None and any(
                Path(os.fsdecode(path)).is_relative_to(folder) for folder in own)

        seen: BaseException | None = error
        while seen is not None:
            if isinstance(seen, shutil.Error) and seen.args and isinstance(seen.args[0], list):
                # copytree gathers its failures as (source, destination, "[Errno N] ...").
                for _, target, why in seen.args[0]:
                    code = re.match(r"\[Errno (\d+)\]", str(why))
                    if code and int(code[1]) in MACHINE_ERRNOS and ours(target):
                        return f"{why} (copying to {target})"
            elif isinstance(seen, OSError) and seen.errno in MACHINE_ERRNOS:
                if seen.errno not in PATH_ERRNOS or ours(seen.filename):
                    where = f": {os.fsdecode(seen.filename)}" if seen.filename else ""
                    return f"[Errno {seen.errno}] {seen.strerror}{where}"
            seen = seen.__cause__ or seen.__context__
        return None

    # -- cost ---------------------------------------------------------------------------

    def _record_usage(self, name: str, worker: BaseWorker) -> None:
        """Keep what the run's instance cost (workers that rent one give ``usage``)."""
        usage = getattr(worker, "usage", None)
        if usage is None or not isinstance(self.source, Ledger):
            return
        try:
            self.source.record_instance(
                name, instance_id=usage.instance_id, instance_type=usage.instance_type,
                market=usage.market, launched_at=usage.launched_at,
                terminated_at=usage.ended_at, seconds=usage.seconds, cost_usd=usage.cost_usd)
        except LedgerError as fatal:
            self._stop_for(fatal)
            return
        with self._slots_lock:
            self._spent_usd += usage.cost_usd or 0.0

    def _budget(self) -> float | None:
        """The event's ``budget_usd`` for its instances (workers that rent them have one)."""
        return getattr(self.config.worker, "budget_usd", None)

    def _over_budget(self) -> bool:
        """Whether the event spent its ``budget_usd`` (said once): no run starts then, and
        the submissions wait as new. Runs already going finish: the overshoot is at most
        theirs."""
        budget = self._budget()
        if budget is None or self._spent_usd < budget:
            return False
        if not self._budget_said:
            self._budget_said = True
            logger.warning("budget spent: %.2f of %.2f USD; no instance is launched, the "
                           "submissions wait as new (raise worker.budget_usd to go on)",
                           self._spent_usd, budget)
        return True

    # -- source helpers -----------------------------------------------------------------

    def _record(self, name: str, state: str, transition: Callable[..., object],
                *arguments: object) -> None:
        transition(*arguments)
        self._changed(name, state)

    def _retry(self, name: str, reason: str) -> None:
        state = self.source.retry(name, reason, self.config.dispatcher.max_attempts)
        logger.warning("%s: %s -> %s", name, reason, state)
        self._changed(name, state)

    def _release(self, name: str) -> None:
        self._record(name, SubmissionState.NEW, self.source.release, name, "dispatcher shut down")

    def _changed(self, name: str, state: str) -> None:
        logger.info("%s: %s", name, state)
        self._on_change(name, state)

    def _worker_dict(self, prepared: dict | None = None) -> dict:
        return self.config.worker_dict(dispatcher_id=self.dispatcher_id,
                                       scratch_dir=str(self.scratch_dir),
                                       live_log_dir=str(livelog.folder(self.config.ledger_path)),
                                       prepared=prepared or {})

    # -- shutdown -----------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Kill what still runs, wait for every slot to tear down and release its claim."""
        with self._slots_lock:
            slots = list(self._slots.values())
        if slots:
            logger.warning("stopping %d running submission(s)", len(slots))
        for _, _, worker in slots:
            if worker is not None:
                worker.kill()
        for _, thread, _ in slots:
            thread.join(SHUTDOWN_GRACE_SECONDS)
        try:
            self.worker_class.close_shared(self._worker_dict())
        except Exception:  # noqa: BLE001 - the shutdown goes on; the worker said what is left
            logger.exception("releasing what the runs shared failed")
