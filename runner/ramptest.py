"""The ramp-test command line every worker runs, its environment, and what it leaves behind."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

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
    message = message or f"ramp-test exited with {returncode}"
    if len(message) > ERROR_MESSAGE_LIMIT:
        message = "...\n" + message[-ERROR_MESSAGE_LIMIT:]
    return message


def timeout_message(timeout: float) -> str:
    """Return the error message recorded for a run stopped at its timeout."""
    return f"Timeout: the submission ran longer than timeout={timeout:g} s and was killed."


# --- Reading what ramp-test --save-output leaves behind ---------------------------------
#
# training_output/ (copied to predictions_dir/<submission>/) holds, for ramp-workflow 0.7:
#   fold_<i>/scores.csv        index column "step" (train, valid, test), one column per
#                              score type, then "time" (the step's seconds)
#   fold_<i>/train_time, valid_time, test_time   one float each (seconds)
#   fold_<i>/state.txt         "scored", or e.g. "training_error" (then error.txt)
#   fold_<i>/y_pred_train.npz, y_pred_test.npz
#   bagged_scores.csv          columns step, n_bag, <scores>: the score of the first
#                              n_bag + 1 folds bagged; the last n_bag is the result.

FOLD_PREFIX = "fold_"
BAGGED_SCORES_FILE = "bagged_scores.csv"
FOLD_SCORES_FILE = "scores.csv"
STEPS = ("train", "valid", "test")
BAGGED_STEPS = ("valid", "test")


@dataclass(frozen=True)
class ScoreType:
    """One score of the problem, named as in ramp-test's output."""

    name: str
    lower_is_better: bool


@dataclass(frozen=True)
class RunResults:
    """The scores and times of one successful ramp-test run."""

    # Per fold: {'train': {score: value}, 'valid': {...}, 'test': {...}}.
    fold_scores: tuple[dict[str, dict[str, float]], ...]
    # The scores of all folds bagged: {'valid': {score: value}, 'test': {...}}.
    bagged_scores: dict[str, dict[str, float]]
    # Summed over folds, in seconds.
    train_time: float
    valid_time: float
    test_time: float


def score_types(kit_dir: str | os.PathLike[str]) -> tuple[ScoreType, ...]:
    """Return the score types of the kit's problem.py, in its order (the first ranks)."""
    # Imported here: rampwf pulls in scikit-learn, which only this function needs.
    from rampwf.utils import assert_read_problem

    problem_file = Path(kit_dir) / "problem.py"
    if not problem_file.is_file():
        raise ValueError(f"{problem_file}: no problem.py in the kit")
    problem = assert_read_problem(str(kit_dir))
    found = getattr(problem, "score_types", None)
    if not found:
        raise ValueError(f"{problem_file}: defines no score_types")
    return tuple(
        ScoreType(name=str(st.name), lower_is_better=bool(st.is_lower_the_better))
        for st in found
    )


def read_results(output_dir: str | os.PathLike[str]) -> RunResults:
    """Parse a training_output tree into scores and times.

    Raises ValueError naming the file when a file is missing or malformed (which is also
    what a failed run looks like: its fold holds error.txt instead of scores).
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ValueError(f"{output_dir}: no such training_output folder")
    fold_dirs = _fold_dirs(output_dir)
    fold_scores = []
    times = {"train": 0.0, "valid": 0.0, "test": 0.0}
    for fold_dir in fold_dirs:
        scores = _read_fold_scores(fold_dir)
        fold_scores.append(scores)
        for step in times:
            # A problem without test data writes no test_time: that step then took 0 s.
            required = step != "test" or "test" in scores
            times[step] += _read_time(fold_dir / f"{step}_time", required)
    return RunResults(
        fold_scores=tuple(fold_scores),
        bagged_scores=_read_bagged_scores(output_dir / BAGGED_SCORES_FILE),
        train_time=times["train"],
        valid_time=times["valid"],
        test_time=times["test"],
    )


def _fold_dirs(output_dir: Path) -> list[Path]:
    numbered = {}
    for path in output_dir.glob(FOLD_PREFIX + "*"):
        suffix = path.name[len(FOLD_PREFIX):]
        if path.is_dir() and suffix.isdigit():
            numbered[int(suffix)] = path
    if not numbered:
        raise ValueError(f"{output_dir / (FOLD_PREFIX + '0')}: missing (no fold folder)")
    # A gap means a fold was lost (a partial copy): its scores would silently vanish.
    for i in range(max(numbered) + 1):
        if i not in numbered:
            raise ValueError(f"{output_dir / f'{FOLD_PREFIX}{i}'}: missing")
    return [numbered[i] for i in sorted(numbered)]


def _read_csv(path: Path, index_col: str | list[str]) -> pd.DataFrame:
    if not path.is_file():
        hint = ""
        error = path.parent / "error.txt"
        if error.is_file():
            # The run failed in this fold: say why rather than just "missing".
            last = error.read_text(errors="replace").strip().splitlines()[-1:]
            hint = f" (the run failed: {error}: {last[0] if last else ''})"
        raise ValueError(f"{path}: missing{hint}")
    try:
        frame = pd.read_csv(path, index_col=index_col)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise ValueError(f"{path}: malformed ({error})") from None
    return frame


def _numeric(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    try:
        return frame.apply(pd.to_numeric, errors="raise").astype(float)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: malformed, a score is not a number ({error})") from None


def _read_fold_scores(fold_dir: Path) -> dict[str, dict[str, float]]:
    path = fold_dir / FOLD_SCORES_FILE
    frame = _read_csv(path, index_col="step")
    # "time" is per step, not a score; the *_time files give the same numbers.
    frame = _numeric(frame.drop(columns=["time"], errors="ignore"), path)
    if frame.columns.empty:
        raise ValueError(f"{path}: malformed, no score columns")
    for step in ("train", "valid"):
        if step not in frame.index:
            raise ValueError(f"{path}: malformed, no '{step}' row")
    return {
        str(step): {str(name): float(value) for name, value in row.items()}
        for step, row in frame.iterrows()
        if step in STEPS
    }


def _read_bagged_scores(path: Path) -> dict[str, dict[str, float]]:
    frame = _read_csv(path, index_col=None)
    for column in ("step", "n_bag"):
        if column not in frame.columns:
            raise ValueError(f"{path}: malformed, no '{column}' column")
    scores = _numeric(frame.drop(columns=["step", "n_bag"]), path)
    if scores.columns.empty:
        raise ValueError(f"{path}: malformed, no score columns")
    n_bag = _numeric(frame[["n_bag"]], path)["n_bag"]
    bagged = {}
    for step in BAGGED_STEPS:
        rows = frame["step"] == step
        if not rows.any():
            continue
        # Row n_bag = k bags the first k + 1 folds; the last one bags them all.
        last = n_bag[rows].idxmax()
        bagged[step] = {str(name): float(scores.at[last, name]) for name in scores.columns}
    if "valid" not in bagged:
        raise ValueError(f"{path}: malformed, no 'valid' rows")
    return bagged


def _read_time(path: Path, required: bool) -> float:
    if not path.is_file():
        if required:
            raise ValueError(f"{path}: missing")
        return 0.0
    text = path.read_text().strip()
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"{path}: malformed, not a number of seconds: {text[:40]!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{path}: malformed, not a duration: {text[:40]!r}")
    return seconds
