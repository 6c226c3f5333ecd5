"""Reading what ``ramp-test --save-output`` leaves behind into scores and times.

training_output/ (copied to predictions_dir/<submission>/) holds, for ramp-workflow 0.7:
  fold_<i>/scores.csv        index column "step" (train, valid, test), one column per
                             score type, then "time" (the step's seconds)
  fold_<i>/train_time, valid_time, test_time   one float each (seconds)
  fold_<i>/state.txt         "scored", or e.g. "training_error" (then error.txt)
  fold_<i>/y_pred_train.npz, y_pred_test.npz
  bagged_scores.csv          columns step, n_bag, <scores>: the score of the first
                             n_bag + 1 folds bagged; the last n_bag is the result.
"""

from __future__ import annotations

import csv
import errno
import io
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

FOLD_PREFIX = "fold_"
BAGGED_SCORES_FILE = "bagged_scores.csv"
FOLD_SCORES_FILE = "scores.csv"
STEPS = ("train", "valid", "test")
BAGGED_STEPS = ("valid", "test")
# A scores file holds a few rows of a few numbers: anything bigger is not ramp-test's, and
# bounding the size bounds the time spent parsing it.
MAX_SCORES_BYTES = 256 * 1024
# Of a failed fold's error.txt, the end is read (the exception's last line is there), and
# the end of that line is quoted: a hint, not the whole error.
ERROR_HINT_BYTES = 4096
ERROR_HINT_CHARACTERS = 300


Scores = dict[str, dict[str, float]]  # step -> score type -> value


@dataclass(frozen=True)
class ScoreType:
    """One score of the problem, named as in ramp-test's output."""

    name: str
    lower_is_better: bool


@dataclass(frozen=True)
class RunResults:
    """The scores and times of one successful ramp-test run."""

    # Per fold: {'train': {score: value}, 'valid': {...}, 'test': {...}}.
    fold_scores: tuple[Scores, ...]
    # The scores of all folds bagged: {'valid': {score: value}, 'test': {...}}.
    bagged_scores: Scores
    # Summed over folds, in seconds.
    train_time: float
    valid_time: float
    test_time: float


def read_results(output_dir: str | os.PathLike[str],
                 types: Sequence[ScoreType] | None = None) -> RunResults:
    """Parse a training_output tree into scores and times.

    With the kit's score ``types``, every one of them must be there, and only they are
    kept. Raises ValueError naming the file when a file is missing or malformed (which is
    also what a failed run looks like: its fold holds error.txt instead of scores): not a
    regular file, bigger than ``MAX_SCORES_BYTES``, a score that is not a finite number.
    """
    # Plain strings, not Paths: 13 files a run, and pathlib's joins cost more than reading.
    output_dir = os.fspath(output_dir)
    names = None if types is None else [t.name for t in types]
    fold_scores = []
    times = {"train": 0.0, "valid": 0.0, "test": 0.0}
    for fold_dir in _fold_dirs(output_dir):
        scores = _read_fold_scores(fold_dir, names)
        fold_scores.append(scores)
        for step in times:
            # A problem without test data writes no test_time: that step then took 0 s.
            required = step != "test" or "test" in scores
            times[step] += read_time(os.path.join(fold_dir, f"{step}_time"), required)
    return RunResults(
        fold_scores=tuple(fold_scores),
        bagged_scores=_read_bagged_scores(os.path.join(output_dir, BAGGED_SCORES_FILE), names),
        train_time=times["train"],
        valid_time=times["valid"],
        test_time=times["test"],
    )


def _fold_dirs(output_dir: str) -> list[str]:
    numbered = {}
    try:
        with os.scandir(output_dir) as entries:
            for entry in entries:
                suffix = entry.name[len(FOLD_PREFIX):]
                if (entry.name.startswith(FOLD_PREFIX) and suffix.isdigit()
                        and entry.is_dir(follow_symlinks=False)):
                    numbered[int(suffix)] = entry.path
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(f"{output_dir}: no such training_output folder") from None
    if not numbered:
        raise ValueError(f"{os.path.join(output_dir, FOLD_PREFIX + '0')}: missing (no fold "
                         "folder)")
    # A gap means a fold was lost (a partial copy): its scores would silently vanish.
    for i in range(max(numbered) + 1):
        if i not in numbered:
            raise ValueError(f"{os.path.join(output_dir, f'{FOLD_PREFIX}{i}')}: missing")
    return [numbered[i] for i in sorted(numbered)]


def _read_small(path: str, limit: int) -> bytes | None:
    """At most ``limit`` + 1 bytes of the regular file ``path``; None when it is missing.

    Opened with O_NOFOLLOW and O_NONBLOCK: a link or a FIFO the run left is refused, never
    followed or waited on.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ValueError(f"{path}: malformed, not a regular file") from None
        raise ValueError(f"{path}: unreadable ({error.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path}: malformed, not a regular file")
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, left)
            chunks.append(chunk)
            if len(chunk) < left:  # a short read of a regular file is its end
                break
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_table(path: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of a scores file, read strictly with the csv module (pandas
    took about 18 ms a run here): a regular file of at most ``MAX_SCORES_BYTES``, UTF-8, every
    row as wide as the header, no column named twice."""
    data = _read_small(path, MAX_SCORES_BYTES)
    if data is None:
        raise ValueError(f"{path}: missing{_failed_fold_hint(path)}")
    if len(data) > MAX_SCORES_BYTES:
        raise ValueError(f"{path}: malformed, over {MAX_SCORES_BYTES} bytes (a scores file "
                         f"holds at most {MAX_SCORES_BYTES})")
    try:
        rows = [row for row in csv.reader(io.StringIO(data.decode(), newline=""), strict=True)
                if row]
    except (UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{path}: malformed ({error})") from None
    if not rows:
        raise ValueError(f"{path}: malformed, empty")
    header, body = rows[0], rows[1:]
    if len(set(header)) != len(header):
        raise ValueError(f"{path}: malformed, a column is named twice")
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}: malformed, line {number} has {len(row)} fields, "
                             f"expected {len(header)}")
    return header, body


def _failed_fold_hint(path: str) -> str:
    """When the run failed in this fold, why (its error.txt's last line), else ''."""
    error = os.path.join(os.path.dirname(path), "error.txt")
    try:
        tail = read_tail(error, ERROR_HINT_BYTES)
    except ValueError:  # a link, a FIFO: no hint from it
        return ""
    if tail is None:
        return ""
    last = tail.decode(errors="replace").strip().splitlines()[-1:]
    return f" (the run failed: {error}: {last[0][-ERROR_HINT_CHARACTERS:] if last else ''})"


def read_tail(path: str, limit: int) -> bytes | None:
    """The last ``limit`` bytes of the regular file ``path`` (a run's file may be any
    size: a 600 MB one-line error.txt was read whole); None when it is missing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ValueError(f"{path}: unreadable ({error.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path}: malformed, not a regular file")
        return os.pread(fd, limit, max(0, info.st_size - limit))
    finally:
        os.close(fd)


def _number(text: str, column: str, path: str) -> float:
    """A score cell as a finite float; anything else names the file and the column."""
    if not text.strip():  # how pandas and ramp-test write a NaN
        raise ValueError(f"{path}: malformed, score {column[:40]!r} is not a finite number "
                         "(empty)")
    try:
        if "_" in text:  # float() takes 1_000, a CSV writer never writes it
            raise ValueError(text)
        value = float(text)
    except ValueError:
        raise ValueError(f"{path}: malformed, a score is not a number: {column[:40]!r} = "
                         f"{text[:40]!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{path}: malformed, score {column[:40]!r} is not a finite number")
    return value


def _score_columns(header: list[str], names: list[str] | None, skip: tuple[str, ...],
                   path: str) -> dict[str, int]:
    """Score name -> column index: the kit's scores (all of them must be there), else
    every column but ``skip``."""
    index = {name: i for i, name in enumerate(header) if name not in skip}
    if names is not None:
        missing = [name for name in names if name not in index]
        if missing:
            raise ValueError(f"{path}: malformed, no column for score {missing[0]!r} of the "
                             "kit")
        index = {name: index[name] for name in names}
    if not index:
        raise ValueError(f"{path}: malformed, no score columns")
    return index


def _column(header: list[str], name: str, path: str) -> int:
    if name not in header:
        raise ValueError(f"{path}: malformed, no '{name}' column")
    return header.index(name)


def _read_fold_scores(fold_dir: str, names: list[str] | None) -> Scores:
    path = os.path.join(fold_dir, FOLD_SCORES_FILE)
    header, rows = _read_table(path)
    step_at = _column(header, "step", path)
    # "time" is per step, not a score; the *_time files give the same numbers.
    columns = _score_columns(header, names, ("step", "time"), path)
    scores: Scores = {}
    for row in rows:
        step = row[step_at]
        if step in scores:
            raise ValueError(f"{path}: malformed, two '{step[:40]}' rows")
        values = {name: _number(row[i], name, path) for name, i in columns.items()}
        if step in STEPS:
            scores[step] = values
    for step in ("train", "valid"):
        if step not in scores:
            raise ValueError(f"{path}: malformed, no '{step}' row")
    return scores


def _read_bagged_scores(path: str, names: list[str] | None) -> Scores:
    header, rows = _read_table(path)
    step_at, n_bag_at = _column(header, "step", path), _column(header, "n_bag", path)
    columns = _score_columns(header, names, ("step", "n_bag"), path)
    # Row n_bag = k bags the first k + 1 folds; the last one bags them all.
    last: dict[str, tuple[float, dict[str, float]]] = {}
    for row in rows:
        n_bag = _number(row[n_bag_at], "n_bag", path)
        values = {name: _number(row[i], name, path) for name, i in columns.items()}
        step = row[step_at]
        if step in BAGGED_STEPS and (step not in last or n_bag > last[step][0]):
            last[step] = (n_bag, values)
    if "valid" not in last:
        raise ValueError(f"{path}: malformed, no 'valid' rows")
    return {step: values for step, (_, values) in last.items()}


def read_time(path: str, required: bool) -> float:
    """The seconds in a fold's ``<step>_time`` file; 0 for a missing one not ``required``."""
    data = _read_small(path, 100)
    if data is None:
        if required:
            raise ValueError(f"{path}: missing")
        return 0.0
    text = data[:100].decode(errors="replace").strip()
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"{path}: malformed, not a number of seconds: {text[:40]!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{path}: malformed, not a duration: {text[:40]!r}")
    return seconds
