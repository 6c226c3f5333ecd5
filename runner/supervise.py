"""Run a command; record its peak memory; kill its process group if its starter dies.

Standalone on purpose (standard library only): it is started with whatever Python a host
has, locally, on a Dask worker or on a remote machine, as

    python supervise.py [--watch PID] [--peak-rss FILE] -- COMMAND [ARG...]

It runs as the leader of the run's process group (its starter gives it a new session), so:
- ``--watch PID``: once PID is gone (a SIGKILLed dispatcher or Dask worker), the whole
  group is killed: no orphan keeps training after the process that owned it;
- ``--peak-rss FILE``: the peak resident memory, in MiB, of the largest process of the run
  is written to FILE when the command ends.
The exit code is the command's, or 128 + signal number when a signal ended it.
"""

import os
import resource
import signal
import subprocess
import sys

CHECK_SECONDS = 1.0
USAGE = "usage: supervise.py [--watch PID] [--peak-rss FILE] -- COMMAND [ARG...]"


def start_time(pid):
    """The kernel's start time of ``pid`` (None once it is gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # fields[0] is the state, fields[19] the start time (fields 3 and 22 of proc(5)).
    return None if fields[0] in ("Z", "X") else fields[19]


def parse(argv):
    """Split ``argv`` into ({option: value}, command)."""
    options = {}
    while argv and argv[0] != "--":
        if argv[0] not in ("--watch", "--peak-rss") or len(argv) < 2:
            sys.exit(USAGE)
        options[argv[0]], argv = argv[1], argv[2:]
    if len(argv) < 2:
        sys.exit(USAGE)
    return options, argv[1:]


def main(argv):
    """Run the command under supervision; return its exit code."""
    options, command = parse(argv)
    watched = int(options["--watch"]) if "--watch" in options else None
    # The start time tells the watched process from a later one that reuses its pid;
    # without /proc (not Linux) there is nothing to watch and the guard only waits.
    born = start_time(watched) if watched is not None else None
    child = subprocess.Popen(command)
    while True:
        try:
            returncode = child.wait(CHECK_SECONDS if born is not None else None)
            break
        except subprocess.TimeoutExpired:
            if start_time(watched) != born:
                os.killpg(os.getpgrp(), signal.SIGKILL)
    if "--peak-rss" in options:
        # Linux reports ru_maxrss in KiB, for the largest descendant that was waited for.
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        with open(options["--peak-rss"], "w") as handle:
            handle.write(f"{peak_kib / 1024:.1f}\n")
    return 128 - returncode if returncode < 0 else returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
