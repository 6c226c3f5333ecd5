"""What a worker AMI promises the dispatcher: the run's user and the heartbeat it must keep.

The values reach the AMI as ramp-worker parameters and the dispatcher as stack outputs, so
the two sides read one definition.
"""

from __future__ import annotations

# Runs ramp-test: no sudo, no group of the instance user; it can read conda and the kit
# but can neither write the instance user's files nor touch the heartbeat.
RUN_USER = "ramp-run"
# The instance halts (and, with shutdown behaviour terminate, ends) when this file's
# modification time is older than the timeout; before the first touch, the boot time counts.
# The dispatcher refreshes it (`touch`) as the instance user at each poll.
HEARTBEAT_FILE = "/run/ramp-runner/heartbeat"
HEARTBEAT_TIMEOUT_SECONDS = 600
