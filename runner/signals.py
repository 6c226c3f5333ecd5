"""SIGINT and SIGTERM: the one place that turns them into a request to stop."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

logger = logging.getLogger("runner.signals")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_on_signals(stop: Callable[[], None]) -> Iterator[threading.Event]:
    """Inside, SIGINT and SIGTERM call ``stop`` (the first one is logged) and set the
    yielded event, which says afterwards whether one came; their handlers are restored on
    leaving.

    Python runs handlers on the main thread only and refuses to install them from any
    other: there, nothing is installed and the event is never set.
    """
    received = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handle(signum: int, frame: object) -> None:
        if not received.is_set():
            logger.warning("%s received: stopping", signal.Signals(signum).name)
        received.set()
        stop()

    previous = {signum: signal.signal(signum, handle) for signum in STOP_SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
