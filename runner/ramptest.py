"""The ramp-test command line every worker runs, its environment, and the error message
kept of a run that failed."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Mapping

# Variables a child may inherit. Everything else (AWS_*, tokens, passwords, the
# dispatcher's own settings) stays with the dispatcher: submissions are untrusted code.
INHERITED_VARIABLES = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "SYSTEMROOT",
)

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

TIMEOUT_RETURNCODE = 124
ERROR_MESSAGE_LIMIT = 4000
# Of a fold's error.txt, the end is read: enough bytes for ERROR_MESSAGE_LIMIT characters
# of UTF-8 (at most 4 bytes each), never the whole file (a run can write 600 MB of it).
ERROR_FILE_TAIL_BYTES = 4 * ERROR_MESSAGE_LIMIT
# Every failed run's message ends with one line starting so, how its process ended.
ENDING_PREFIX = "ramp-runner: "
TRACEBACK_HEADER = "Traceback (most recent call last):"
# What Python prints between the tracebacks of chained exceptions.
CHAINED = ("During handling of the above exception, another exception occurred:",
           "The above exception was the direct cause of the following exception:")
# "ValueError: why", "pkg.module.Error", "KeyboardInterrupt": an unindented exception line.
EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(:( .*)?)?")


def command(
    submission: str,
    kit_dir: str,
    data_dir: str,
    submissions_dir: str,
    ramp_test: str = "ramp-test",
) -> list[str]:
    """Return the argv that trains, tests and saves the output of one submission."""
    return [
        ramp_test,
        "--submission",
        submission,
        "--ramp-kit-dir",
        kit_dir,
        "--ramp-data-dir",
        data_dir,
        "--ramp-submission-dir",
        submissions_dir,
        "--save-output",
        "--ignore-warning",
    ]


def child_environment(
    n_threads: int | None,
    parent: Mapping[str, str] | None = None,
    extra_path: str | None = None,
) -> dict[str, str]:
    """Return the allow-listed environment of a ramp-test child.

    ``extra_path`` (an environment's ``bin`` folder) goes first on PATH so that
    ``ramp-test`` and ``python`` resolve inside that environment.
    """
    parent = os.environ if parent is None else parent
    env = {name: parent[name] for name in INHERITED_VARIABLES if name in parent}
    env["PYTHONUNBUFFERED"] = "1"
    if extra_path:
        env["PATH"] = os.pathsep.join(p for p in (extra_path, env.get("PATH")) if p)
    if n_threads is not None:
        env.update({name: str(n_threads) for name in THREAD_VARIABLES})
    return env


def traceback_of(log: str) -> str:
    """The traceback that ends ``log`` (an uncaught exception: nothing after it but its
    exception line, with the tracebacks chained before it), else ''.

    Only the end counts: the first ``Traceback`` of a log may be one the submission printed,
    followed by ramp-test's private test scores (RAMP's issue 179).
    """
    lines = log.rstrip().splitlines()
    start = _traceback_before(lines, len(lines))
    if start is None:
        return ""
    while (chain := _previous_line(lines, start)) is not None and lines[chain] in CHAINED:
        earlier = _traceback_before(lines, chain)
        if earlier is None:
            break
        start = earlier
    return "\n".join(lines[start:]).strip()


def _previous_line(lines: list[str], index: int) -> int | None:
    """The last non-blank line before ``index``."""
    index -= 1
    while index >= 0 and not lines[index].strip():
        index -= 1
    return index if index >= 0 else None


def _traceback_before(lines: list[str], stop: int) -> int | None:
    """Where the traceback whose exception line is the last before ``stop`` starts: its
    header, then only frame lines (indented with spaces: ramp-test's score rows start with a
    tab), or None when ``lines[:stop]`` does not end with one."""
    index = _previous_line(lines, stop)
    if index is None or not EXCEPTION_LINE.fullmatch(lines[index]):
        return None
    index -= 1
    while index >= 0 and (not lines[index].strip() or lines[index].startswith("  ")):
        index -= 1
    return index if index >= 0 and lines[index] == TRACEBACK_HEADER else None


def error_message(log: str, fold_error: str | None) -> str:
    """What a failed run says of its error: the end of the failed fold's ``error.txt``
    (``fold_error``) when it left one, else the traceback that ends its log, else ''.

    Never other lines of the log: they hold ramp-test's private test scores. Bounded to
    the last ``ERROR_MESSAGE_LIMIT`` characters: that is where the exception is.
    """
    return bounded((fold_error or traceback_of(log)).strip())


def bounded(message: str) -> str:
    """``message`` cut to its last ``ERROR_MESSAGE_LIMIT`` characters (an error's end)."""
    if len(message) > ERROR_MESSAGE_LIMIT:
        message = "...\n" + message[-ERROR_MESSAGE_LIMIT:]
    return message


def timeout_message(timeout: float) -> str:
    """ramp-runner's last line of a run stopped at its timeout."""
    return f"{ENDING_PREFIX}the run was stopped at its timeout (timeout={timeout:g} s)"


def stop_message(reason: str) -> str:
    """ramp-runner's last line of a run stopped before it could exit (a limit, a lost
    worker), ``reason`` saying why."""
    return f"{ENDING_PREFIX}the run was stopped: {reason or 'before it could exit'}"


def exit_message(returncode: int) -> str:
    """ramp-runner's last line of a run that exited: its code, or the signal that ended it
    (a negative code from Popen, or 128 + the signal's number from a shell or the
    supervisor)."""
    number = -returncode if returncode < 0 else returncode - 128
    try:
        name = signal.Signals(number).name if number > 0 else None
    except ValueError:  # 128 + a number that is no signal: the command's own code
        name = None
    if name is None:
        return f"{ENDING_PREFIX}the run exited with code {returncode}"
    return f"{ENDING_PREFIX}the run was killed by signal {name} (exit code {returncode})"


def ended(message: str, ending: str) -> str:
    """``message`` (already bounded) followed by ramp-runner's ``ending`` line, never cut."""
    return f"{message}\n{ending}" if message else ending


def is_ended(message: str) -> bool:
    """Whether ``message`` ends with one of ramp-runner's ending lines (a message of the
    built-in workers' collect path)."""
    return message.rpartition("\n")[2].startswith(ENDING_PREFIX)
