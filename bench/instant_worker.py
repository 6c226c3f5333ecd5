"""A worker that finishes at once, so that only the dispatcher's own cost is left to measure.

bench/scale.py registers it under ``worker_type: bench-instant`` through the same entry-point
group a third-party worker uses. Each run hands back one real ramp-test output (a symlink
to the folder named by the worker key ``bench_output``), so the dispatcher reads real
scores and records ``scored``, as after a real run.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from runner.worker import BaseWorker


class InstantWorker(BaseWorker):
    """Set up, launched, finished and collected without doing anything."""

    # submission -> time.time() its setup began (bench/scale.py's arrival-to-start latency)
    setup_started: dict[str, float] = {}
    # CPU seconds spent by this worker itself (making each run's output link: on ext4, a
    # quarter of the process's time, in the kernel's inode allocation), which bench/scale.py
    # tells apart from the dispatcher's.
    own_cpu = 0.0
    _own_cpu_lock = threading.Lock()

    def setup(self) -> None:
        """Note when the dispatcher got this far."""
        InstantWorker.setup_started[self.submission] = time.time()
        super().setup()

    @classmethod
    def warm_up(cls, config: dict) -> None:
        """Nothing to load: its results are installed without being re-scored."""

    def _is_submission_finished(self) -> bool:
        return True

    def collect_results(self) -> tuple[int, str]:
        """Install the real output under the submission's name."""
        super().collect_results()
        started = time.thread_time()
        target = Path(self.config["predictions_dir"]) / self.submission
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(self.config["bench_output"], target)
        with InstantWorker._own_cpu_lock:
            InstantWorker.own_cpu += time.thread_time() - started
        self.status = "collected"
        return 0, ""
