"""Warm instances (``reuse_instances``): what a dispatcher's AWS runs leave for the next.

The dispatcher makes one AWSWorker per submission, so the instances waiting between two
runs live here, one pool per dispatcher id, shared by its slots. An instance waits at
most ``idle_minutes`` (a timer terminates it), and every pool is drained, its instances
terminated, when its dispatcher shuts down (``AWSWorker.close_shared``) or the process
exits. An instance is put here only by a run that ended cleanly (``AWSWorker``).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from runner.aws import ec2
from runner.errors import InfrastructureError

logger = logging.getLogger("runner.worker")


@dataclass
class WarmInstance:
    """An instance waiting for its next run: where to reach it, how many runs it served,
    since when it waits (seconds since the epoch) and when its self-destruct halts it."""

    instance: ec2.Instance
    client: Any
    host: str
    port: int
    runs: int
    idle_since: float
    self_destruct_at: float
    timer: threading.Timer | None = field(default=None, repr=False)


_lock = threading.Condition()
_pools: dict[str, list[WarmInstance]] = {}
# Per pool, the instances whose run ended and that are on their way back (their outputs
# are being fetched): the dispatcher starts the next run at once, which waits for one
# rather than paying a boot.
_returning: dict[str, int] = {}


def take(key: str, wait_seconds: float = 0.0,
         stop: threading.Event | None = None) -> WarmInstance | None:
    """The instance of pool ``key`` that waited least, out of the pool; while none waits
    but one is on its way back, wait for it up to ``wait_seconds`` (or ``stop``); None
    when there is none."""
    deadline = time.monotonic() + wait_seconds
    with _lock:
        while not _pools.get(key) and _returning.get(key, 0) > 0:
            left = deadline - time.monotonic()
            if left <= 0 or (stop is not None and stop.is_set()):
                break
            _lock.wait(min(left, 0.5))
        waiting = _pools.get(key)
        if not waiting:
            return None
        warm = waiting.pop()
    if warm.timer is not None:
        warm.timer.cancel()
    return warm


def returning(key: str, change: int) -> None:
    """Count an instance on its way back to pool ``key`` (+1), or no longer (-1)."""
    with _lock:
        _returning[key] = _returning.get(key, 0) + change
        _lock.notify_all()


def give_back(key: str, warm: WarmInstance, idle_seconds: float) -> None:
    """Keep ``warm`` in pool ``key`` for ``idle_seconds``; then terminate it."""
    warm.timer = threading.Timer(idle_seconds, _expire, (key, warm))
    warm.timer.daemon = True
    with _lock:
        _pools.setdefault(key, []).append(warm)
        _lock.notify_all()
    warm.timer.start()


def waiting(key: str) -> list[str]:
    """The ids of the instances waiting in pool ``key``."""
    with _lock:
        return [warm.instance.instance_id for warm in _pools.get(key, [])]


def _expire(key: str, warm: WarmInstance) -> None:
    with _lock:
        waiting = _pools.get(key, [])
        if warm not in waiting:
            return  # taken by a run in the meantime
        waiting.remove(warm)
    retire(warm, f"idle for {time.time() - warm.idle_since:.0f} s")


def drain(key: str) -> list[str]:
    """Terminate every instance waiting in pool ``key``; return their ids."""
    with _lock:
        waiting = _pools.pop(key, [])
    for warm in waiting:
        if warm.timer is not None:
            warm.timer.cancel()
        retire(warm, "its dispatcher stops")
    return [warm.instance.instance_id for warm in waiting]


def retire(warm: WarmInstance, why: str) -> None:
    """Terminate a warm instance; when EC2 refuses, say so in one line (its heartbeat
    timer halts it ten minutes after its last run at the latest)."""
    instance_id = warm.instance.instance_id
    try:
        ec2.terminate(warm.client, [instance_id])
        logger.info("instance %s terminated after %d run(s): %s", instance_id, warm.runs, why)
    except (BotoCoreError, ClientError, InfrastructureError) as error:
        logger.error("could not terminate warm instance %s (%s): %s; its heartbeat timer "
                     "halts it, `invoke reap` terminates it once EC2 answers", instance_id,
                     why, " ".join(str(error).split()))


@atexit.register
def _drain_all() -> None:
    # A process that ends without its dispatcher's shutdown (launch() alone) leaks nothing.
    for key in list(_pools):
        drain(key)
