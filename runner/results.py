"""What a finished run leaves on the dispatcher's side: its log, its error, its predictions.

``BaseWorker.collect_results`` installs every built-in worker's run with ``install_run``,
so that where a run happened changes nothing in the log, the error message or the
predictions it is judged by.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner import blinded, ramptest, rescoring, supervise, training_output
from runner.blinded import BlindedData
from runner.config import WorkerSection
from runner.errors import EventError, SubmissionError
from runner.training_output import RunResults, read_results

MIB = 1024 * 1024
# ramp-test leaves a few files per fold; more entries than this is not a result.
MAX_OUTPUT_ENTRIES = 10_000
COPY_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class RunEnd:
    """How a run ended, as its worker saw it."""

    # ramp-test's exit code; None when the run was stopped before it could exit.
    returncode: int | None
    timed_out: bool = False
    # Why a run without an exit code was stopped (a limit, a lost worker).
    stopped: str = ""
    # Why the results of a run that exited 0 were refused where it ran (a Dask worker).
    refused: str = ""


def install_run(settings: WorkerSection, submission: str, end: RunEnd, log_file: Path,
                output_dir: Path | None, hidden: BlindedData | None = None
                ) -> tuple[int, str, RunResults | None]:
    """Install the run's log and, when it succeeded, its ``training_output`` as predictions.

    ``log_file`` and ``output_dir`` are the worker's local copies, written by the untrusted
    run. With ``hidden`` test labels, the run wrote predictions only (runner/ingest.py):
    they are scored here, into the tree ramp-test writes, and that tree is installed.
    Returns ``(returncode, error_msg, results)``, the results as read and checked before
    they were installed (None unless the run succeeded); raises SubmissionError (after
    installing the log) when the run exited 0 but left no usable results: no
    ``training_output`` folder, links or special files in it, more than
    ``output_limit_mb``, or scores that are malformed or do not match the predictions.

    Both the log and every message (error_msg, or the SubmissionError's) end with
    ramp-runner's line saying how the run's process ended, whatever the run printed or
    closed; a message is otherwise only the run's error (``ramptest.error_message``).
    """
    ending = run_ending(end, settings.timeout)
    log = _read_log(log_file, settings.log_limit_mb)
    _replace_file(Path(settings.logs_dir) / submission / "log",
                  ramptest.ended(log.rstrip(), ending) + "\n")
    if end.timed_out or end.returncode != 0:
        returncode = (ramptest.TIMEOUT_RETURNCODE if end.timed_out
                      else 1 if end.returncode is None else end.returncode)
        error = ramptest.error_message(log, fold_error(output_dir))
        return returncode, ramptest.ended(error, ending), None
    try:
        if end.refused:
            raise SubmissionError(end.refused)
        if output_dir is None or not stat.S_ISDIR(_lstat_mode(output_dir)):
            raise SubmissionError("ramp-test exited with 0 but left no training_output folder "
                                  "(did the submission remove it?)")
        limit = settings.output_limit_mb * MIB
        if hidden is None:
            def check(tree: Path) -> RunResults:
                return rescoring.verify_results(tree, settings.kit_dir, settings.data_dir,
                                                limit)
        else:
            output_dir = _scored(settings, hidden, output_dir, limit)

            def check(tree: Path) -> RunResults:  # scored here: nothing to recompute
                return read_results(tree, rescoring.score_types(settings.kit_dir))
        results = install_predictions(output_dir, Path(settings.predictions_dir) / submission,
                                      limit, check=check)
    except SubmissionError as error:
        raise SubmissionError(ramptest.ended(str(error), ending)) from error
    return 0, "", results


def run_ending(end: RunEnd, timeout: float) -> str:
    """ramp-runner's line saying how the run's process ended: its exit code or signal, the
    timeout, or what stopped it."""
    if end.timed_out:
        return ramptest.timeout_message(timeout)
    if end.returncode is None:
        return ramptest.stop_message(end.stopped)
    return ramptest.exit_message(end.returncode)


# More folds than this is not ramp-test's output: the search for the failed one stops.
MAX_FOLDS = 1000


def fold_error(output_dir: Path | None) -> str | None:
    """The end of the failed fold's ``error.txt`` (ramp-test and runner.ingest write the
    traceback there), or None when the run left none.

    ramp-test stops at the first failed fold: the first ``fold_<i>`` holding one is it.
    Folders are taken only when they are folders, not links (the run made them: a link
    would have the dispatcher read a file of its choice), and the file's end only.
    """
    if output_dir is None or not stat.S_ISDIR(_lstat_mode(output_dir)):
        return None
    for index in range(MAX_FOLDS):
        fold = output_dir / f"{training_output.FOLD_PREFIX}{index}"
        if not stat.S_ISDIR(_lstat_mode(fold)):
            return None
        try:
            tail = training_output.read_tail(str(fold / "error.txt"),
                                             ramptest.ERROR_FILE_TAIL_BYTES)
        except ValueError:  # a link, a FIFO, unreadable: not an error file
            return None
        if tail is not None:
            return tail.decode(errors="replace")
    return None


def _scored(settings: WorkerSection, hidden: BlindedData, predictions: Path,
            limit_bytes: int) -> Path:
    """Score the predictions a run left (checked first: no links, bounded) into the
    training_output tree beside them; return that tree."""
    check_tree(predictions, limit_bytes)
    scored = predictions.with_name(f"{predictions.name}.scored")
    blinded.score(settings.kit_dir, settings.data_dir, hidden, predictions, scored)
    return scored


def install_predictions(source: Path, target: Path, limit_bytes: int,
                        check: Callable[[Path], Any] | None = None) -> Any:
    """Replace ``target`` with a copy of ``source`` that ``check`` accepted; return what
    ``check`` returned.

    The copy follows no link and takes only folders and regular files, at most
    ``limit_bytes`` of them in all (their apparent size: a sparse file counts whole);
    anything else is the submission's SubmissionError, and a failed copy leaves no half
    folder.
    """
    check_tree(source, limit_bytes)
    target.parent.mkdir(parents=True, exist_ok=True)
    incoming = Path(tempfile.mkdtemp(prefix=f".{target.name}.incoming-", dir=target.parent))
    try:
        _copy_tree(source, incoming / "tree", [limit_bytes])
        checked = check(incoming / "tree") if check is not None else None
        if target.exists():
            shutil.rmtree(target)
        os.replace(incoming / "tree", target)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    return checked


def _lstat_mode(path: Path) -> int:
    try:
        return os.lstat(path).st_mode
    except OSError:
        return 0


def _refuse(path: Path, what: str) -> SubmissionError:
    return SubmissionError(f"training_output: {path.name} is {what}; only folders and regular "
                           "files are collected (links and special files are refused)")


def check_tree(source: Path, limit_bytes: int) -> None:
    """Raise SubmissionError for a tree with links, special files, more than
    ``MAX_OUTPUT_ENTRIES`` entries or more than ``limit_bytes`` (apparent size)."""
    total, entries, stack = 0, 0, [source]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as found:
            for entry in found:
                entries += 1
                if entries > MAX_OUTPUT_ENTRIES:
                    raise SubmissionError(f"training_output holds more than "
                                          f"{MAX_OUTPUT_ENTRIES} files and folders")
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    stack.append(Path(entry.path))
                elif stat.S_ISREG(info.st_mode):
                    total += info.st_size
                else:
                    raise _refuse(Path(entry.path), _kind(info.st_mode))
                if total > limit_bytes:
                    raise SubmissionError(
                        f"training_output holds more than output_limit_mb="
                        f"{limit_bytes // MIB} MB (a sparse file counts at its full size)")


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def _copy_tree(source: Path, target: Path, budget: list[int]) -> None:
    """Copy without following links; ``budget`` (bytes left) bounds what is written."""
    target.mkdir()
    with os.scandir(source) as found:
        entries = list(found)
    for entry in entries:
        path = Path(entry.path)
        mode = entry.stat(follow_symlinks=False).st_mode
        if stat.S_ISDIR(mode):
            _copy_tree(path, target / entry.name, budget)
        elif stat.S_ISREG(mode):
            _copy_file(path, target / entry.name, budget)
        else:
            raise _refuse(path, _kind(mode))


def _copy_file(source: Path, target: Path, budget: list[int]) -> None:
    # O_NOFOLLOW and O_NONBLOCK: a link or a FIFO put in place since the scan is refused,
    # never followed or waited on; the budget holds even for a file that grew.
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        raise _refuse(source, f"unreadable ({error.strerror})") from None
    with os.fdopen(fd, "rb") as reader:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _refuse(source, _kind(os.fstat(fd).st_mode))
        with open(target, "wb") as writer:
            while chunk := reader.read(COPY_CHUNK):
                budget[0] -= len(chunk)
                if budget[0] < 0:
                    raise SubmissionError("training_output holds more than output_limit_mb")
                writer.write(chunk)


def _read_log(path: Path, limit_mb: int) -> str:
    """The log as text, at most ``limit_mb``: its head and tail around a marker."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            limit = limit_mb * MIB
            if size <= limit:
                data = handle.read(limit)
            else:
                head = handle.read(limit // 2)
                handle.seek(size - limit // 2)
                tail = handle.read(limit // 2)
                data = head + supervise.cut_marker(size - len(head) - len(tail),
                                                   limit_mb).encode() + tail
    except OSError:
        return ""
    return data.decode(errors="replace")


def _replace_file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)  # a full disk must not keep half a log
        raise


# The supervisor's reason file is a few hundred bytes; more is not read.
REASON_MAX_BYTES = 64 * 1024


def read_reason(path: Path) -> dict[str, Any] | None:
    """The supervisor's ``--reason`` file (why it stopped the run), or None without one."""
    try:
        with open(path, "rb") as handle:
            reason = json.loads(handle.read(REASON_MAX_BYTES))
    except (OSError, ValueError):
        return None
    return reason if isinstance(reason, dict) else None


def run_end(reason: dict[str, Any] | None, returncode: int | None, timed_out: bool,
            where: str = "") -> RunEnd:
    """How a supervised run ended, given the supervisor's ``reason`` (None: it did not stop
    the run). A sandbox that could not start the run is the event's EventError; a limit
    ends it as the submission's error, unless the run had timed out first."""
    if reason is not None and reason.get("fault") == "event":
        raise EventError(ramptest.bounded(f"{where}{reason.get('message')}"))
    if reason is not None and not timed_out:
        return RunEnd(None, stopped=str(reason.get("message")))
    return RunEnd(None if timed_out else returncode, timed_out=timed_out)
