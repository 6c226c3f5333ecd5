"""What a finished run leaves on the dispatcher's side: its log, its error, its predictions.

Every worker ends ``collect_results`` with ``install_run``, so that where a run happened
changes nothing in the log, the error message or the predictions it is judged by.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner import ramptest
from runner.errors import SubmissionError


@dataclass(frozen=True)
class RunEnd:
    """How a run ended, as its worker saw it."""

    # ramp-test's exit code; None when the run was stopped before it could exit.
    returncode: int | None
    timed_out: bool = False
    # Why a run without an exit code was stopped (shown as its error message).
    stopped: str = ""


def install_run(config: dict[str, Any], submission: str, timeout: float, end: RunEnd,
                log_file: Path, output_dir: Path | None) -> tuple[int, str]:
    """Install the run's log and, when it succeeded, its ``training_output`` as predictions.

    ``log_file`` and ``output_dir`` are the worker's local copies. Returns
    ``(returncode, error_msg)``; raises SubmissionError (after installing the log) when
    ramp-test exited 0 without leaving a ``training_output`` folder.
    """
    log = log_file.read_text(errors="replace") if log_file.is_file() else ""
    if end.timed_out:
        returncode, error_msg = ramptest.TIMEOUT_RETURNCODE, ramptest.timeout_message(timeout)
    elif end.returncode is None:
        returncode, error_msg = 1, end.stopped or "the run was stopped before its end"
    else:
        returncode = end.returncode
        error_msg = "" if returncode == 0 else ramptest.error_message(log, returncode)
    if end.timed_out or end.returncode is None:
        log += f"\n{error_msg}\n"
    _replace_file(Path(config["logs_dir"]) / submission / "log", log)
    if returncode == 0:
        if output_dir is None or not output_dir.is_dir():
            raise SubmissionError("ramp-test exited with 0 but left no training_output folder "
                                  "(did the submission remove it?)")
        install_predictions(output_dir, Path(config["predictions_dir"]) / submission)
    return returncode, error_msg


def install_predictions(source: Path, target: Path) -> None:
    """Replace ``target`` with a copy of ``source``; a failed copy leaves no half folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    incoming = Path(tempfile.mkdtemp(prefix=f".{target.name}.incoming-", dir=target.parent))
    try:
        shutil.copytree(source, incoming / "tree")
        if target.exists():
            shutil.rmtree(target)
        os.replace(incoming / "tree", target)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)


def _replace_file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)
