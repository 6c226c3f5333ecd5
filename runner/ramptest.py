"""The ramp-test command line every worker runs, its environment, and the error message
kept of a run that failed."""

from __future__ import annotations

import os
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
# The error message kept of a failed run without a traceback: the log's last lines.
ERROR_TAIL_LINES = 20
ERROR_MESSAGE_LIMIT = 4000


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
    """Return the traceback part of a ramp-test log ('' when there is none)."""
    start = log.find("Traceback")
    return log[start:].strip() if start >= 0 else ""


def error_message(log: str, returncode: int) -> str:
    """The error message of a failed run: its traceback, else the log's last lines.

    Bounded to its last ``ERROR_MESSAGE_LIMIT`` characters: that is where the exception is.
    """
    message = traceback_of(log) or "\n".join(log.strip().splitlines()[-ERROR_TAIL_LINES:])
    return bounded(message or f"ramp-test exited with {returncode}")


def bounded(message: str) -> str:
    """``message`` cut to its last ``ERROR_MESSAGE_LIMIT`` characters (an error's end)."""
    if len(message) > ERROR_MESSAGE_LIMIT:
        message = "...\n" + message[-ERROR_MESSAGE_LIMIT:]
    return message


def timeout_message(timeout: float) -> str:
    """Return the error message recorded for a run stopped at its timeout."""
    return f"Timeout: the submission ran longer than timeout={timeout:g} s and was killed."
