"""runner.signals: SIGINT and SIGTERM become one call to stop, and leave no handler behind."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from runner.signals import STOP_SIGNALS, stop_on_signals


@pytest.mark.parametrize("signum", STOP_SIGNALS)
def test_a_stop_signal_calls_stop_and_the_handlers_come_back(signum, caplog):
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    calls = []
    with stop_on_signals(lambda: calls.append("stop")) as received:
        assert not received.is_set()
        os.kill(os.getpid(), signum)
        os.kill(os.getpid(), signum)
    assert calls == ["stop", "stop"]
    assert received.is_set()
    # Said once, however many come.
    assert caplog.messages == [f"{signal.Signals(signum).name} received: stopping"]
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


def test_outside_the_main_thread_nothing_is_installed():
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    seen = []

    def inside() -> None:
        with stop_on_signals(lambda: None) as received:
            seen.append(({s: signal.getsignal(s) for s in STOP_SIGNALS}, received.is_set()))

    thread = threading.Thread(target=inside)
    thread.start()
    thread.join()
    assert seen == [(before, False)]
