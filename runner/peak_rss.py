"""Run a command and write the peak resident memory of its process tree to a file.

Standalone on purpose (standard library only): it is started with whatever Python a host
has, locally or on a remote machine, as ``python peak_rss.py OUT -- COMMAND...``.
The exit code is the command's, or 128 + signal number when a signal ended it.
"""

import resource
import subprocess
import sys


def main(argv):
    """Run ``argv[2:]`` (after ``OUT --``), write its peak RSS in MiB to OUT, exit as it did."""
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: peak_rss.py OUT -- COMMAND [ARG...]")
    out, command = argv[0], argv[2:]
    returncode = subprocess.call(command)
    # Linux reports ru_maxrss in KiB, for the largest descendant that was waited for.
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with open(out, "w") as handle:
        handle.write(f"{peak_kib / 1024:.1f}\n")
    return 128 - returncode if returncode < 0 else returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
