"""The ramp-test command line every worker runs, its environment, and what it leaves behind."""

from __future__ import annotations

import copy
import csv
import errno
import functools
import io
import logging
import math
import os
import stat
import threading
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import SubmissionError

logger = logging.getLogger("runner.ramptest")

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
# A scores file holds a few rows of a few numbers: anything bigger is not ramp-test's, and
# bounding the size bounds the time spent parsing it.
MAX_SCORES_BYTES = 256 * 1024
# Scores recomputed from the predictions and those ramp-test wrote agree to this.
SCORE_TOLERANCE = 1e-9
# Collecting threads and the warm-up load a kit's problem and ground truth once, not each
# its own copy while the first load runs.
_LOADING = threading.RLock()


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


def score_types(kit_dir: str | os.PathLike[str]) -> tuple[ScoreType, ...]:
    """Return the score types of the kit's problem.py, in its order (the first ranks)."""
    problem_file = Path(kit_dir) / "problem.py"
    if not problem_file.is_file():
        raise ValueError(f"{problem_file}: no problem.py in the kit")
    problem = _problem(str(kit_dir))
    found = getattr(problem, "score_types", None)
    if not found:
        raise ValueError(f"{problem_file}: defines no score_types")
    return tuple(
        ScoreType(name=str(st.name), lower_is_better=bool(st.is_lower_the_better))
        for st in found
    )


def _problem(kit_dir: str) -> Any:
    with _LOADING:
        return _load_problem(kit_dir)


@functools.lru_cache(maxsize=4)
def _load_problem(kit_dir: str) -> Any:
    # Imported here: rampwf pulls in scikit-learn, which only the kit's problem needs.
    from rampwf.utils import assert_read_problem

    return assert_read_problem(kit_dir)


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
            times[step] += _read_time(os.path.join(fold_dir, f"{step}_time"), required)
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
    error = Path(path).parent / "error.txt"
    if not error.is_file():
        return ""
    last = error.read_text(errors="replace").strip().splitlines()[-1:]
    return f" (the run failed: {error}: {last[0] if last else ''})"


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


def _read_time(path: str, required: bool) -> float:
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


# --- Checking what a run claims ---------------------------------------------------------
#
# The submission's code runs in the same process as ramp-test, so an atexit hook (or a
# thread) can rewrite bagged_scores.csv after ramp-test wrote it: no file mode or sandbox
# can make a file unwritable to the very process that wrote it. The honest check is the
# other one: the bagged scores are recomputed here, outside the sandbox, with the kit's own
# score types, folds and ground truth, from the predictions the run saved, and a run whose
# scores differ is refused. (The predictions themselves are the run's to make: ramp-test
# hands the test data to the submission's process, as RAMP does.)


def verify_results(output_dir: str | os.PathLike[str], kit_dir: str | os.PathLike[str],
                   data_dir: str | os.PathLike[str], max_prediction_bytes: int) -> RunResults:
    """Read a run's results strictly and check its bagged scores against its predictions.

    Raises SubmissionError (the run's fault) for unusable or forged results. Where the kit
    or its data are not on this machine (a Dask or remote worker's own paths), what can be
    checked is: without the kit, the file formats; without the data, the kit's score
    columns too; the unchecked part is logged once.
    """
    types = None
    if (Path(kit_dir) / "problem.py").is_file():
        types = score_types(kit_dir)
    else:
        _unverified(str(kit_dir), "the kit is not on this machine")
    try:
        results = read_results(output_dir, types)
    except ValueError as error:
        # Named as the participant knows it, not by the dispatcher's staging folder.
        message = str(error).replace(str(output_dir), "training_output")
        raise SubmissionError(bounded(f"unusable results: {message}")) from None
    if types is None:
        return results
    try:
        problem, y_train, y_test, folds = _ground_truth(str(kit_dir), str(data_dir))
    except Exception as error:  # noqa: BLE001 - whatever the kit raises without its data
        _unverified(str(kit_dir), f"its data cannot be read here: {type(error).__name__}: "
                                  f"{error}")
        return results
    claimed = results.bagged_scores
    if (y_test is None) != ("test" not in claimed) or len(folds) != len(results.fold_scores):
        raise SubmissionError(f"unusable results: {len(results.fold_scores)} folds and steps "
                              f"{sorted(claimed)}, expected {len(folds)} folds of the kit")
    folds_scored, bagged = _scores_from_predictions(
        Path(output_dir), str(data_dir), problem, y_train, y_test, folds, max_prediction_bytes)
    said = [(f"{FOLD_PREFIX}{i}/{FOLD_SCORES_FILE}", results.fold_scores[i], scores)
            for i, scores in enumerate(folds_scored)]
    for where, claimed_scores, recomputed in [*said, (BAGGED_SCORES_FILE, claimed, bagged)]:
        for step, scores in recomputed.items():
            for name, value in scores.items():
                written = claimed_scores.get(step, {}).get(name)
                if written is None or not math.isclose(written, value, rel_tol=SCORE_TOLERANCE,
                                                       abs_tol=SCORE_TOLERANCE):
                    shown = "nothing" if written is None else f"{written:.6g}"
                    raise SubmissionError(
                        f"forged scores refused: {where} says {step} {name} = {shown}, but "
                        f"the saved predictions score {value:.6g}")
    return results


def warm(kit_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str]) -> None:
    """Load the kit's problem, its ground truth and rampwf's scoring code now (about a
    second of imports), so that the first run's check does not wait for them; what fails
    here is said when a run is checked."""
    if not (Path(kit_dir) / "problem.py").is_file():
        return
    try:
        score_types(kit_dir)
        _ground_truth(str(kit_dir), str(data_dir))
        from rampwf.utils.io import load_y_pred  # noqa: F401 - imported for its cost
    except Exception as error:  # noqa: BLE001 - verify_results says it, once, if it lasts
        logger.debug("warming the scoring code of %s failed: %s", kit_dir, error)


@functools.cache
def _unverified(kit_dir: str, why: str) -> None:
    logger.warning("scores are not recomputed from the predictions (%s: %s): a submission "
                   "could forge them", kit_dir, why)


def _ground_truth(kit_dir: str, data_dir: str) -> tuple[Any, Any, Any, list]:
    """The kit's problem, its targets and folds, as ramp-test computes them."""
    with _LOADING:
        return _load_ground_truth(kit_dir, data_dir)


@functools.lru_cache(maxsize=4)
def _load_ground_truth(kit_dir: str, data_dir: str) -> tuple[Any, Any, Any, list]:
    problem = _problem(kit_dir)
    X_train, y_train = problem.get_train_data(path=data_dir)
    try:
        _, y_test = problem.get_test_data(path=data_dir)
    except (FileNotFoundError, OSError):
        y_test = None
    return problem, y_train, y_test, list(problem.get_cv(X_train, y_train))


def _scores_from_predictions(output_dir: Path, data_dir: str, problem: Any, y_train: Any,
                             y_test: Any, folds: list,
                             max_bytes: int) -> tuple[list[Scores], Scores]:
    """Each fold's train/valid/test scores and the all-folds bag of valid and test, computed
    from the run's saved predictions with the kit's score types, as ramp-test computes them."""
    from rampwf.utils.io import load_y_pred

    def load(fold_dir: Path, suffix: str) -> Any:
        _check_npz(fold_dir / f"y_pred_{suffix}.npz", max_bytes)
        try:
            return load_y_pred(problem, data_path=data_dir, input_path=str(fold_dir),
                               suffix=suffix)
        except Exception as error:  # noqa: BLE001 - a prediction file is the run's
            raise SubmissionError(bounded(
                f"unusable results: {fold_dir.name}/y_pred_{suffix}: "
                f"{type(error).__name__}: {error}")) from None

    predictions = problem.Predictions
    folds_scored, valid_bag, test_bag = [], [], []
    try:
        for i, (train_is, valid_is) in enumerate(folds):
            fold_dir = output_dir / f"{FOLD_PREFIX}{i}"
            y_pred_train = load(fold_dir, "train")
            pairs = {step: (predictions(y_true=y_train, fold_is=indexes),
                            predictions(y_pred=y_pred_train, fold_is=indexes))
                     for step, indexes in (("train", train_is), ("valid", valid_is))}
            valid_bag.append(pairs["valid"][1])
            if y_test is not None:
                test_bag.append(predictions(y_pred=load(fold_dir, "test")))
                pairs["test"] = (predictions(y_true=y_test), test_bag[-1])
            # rampwf's score_matrix, without the DataFrame it builds around the numbers.
            folds_scored.append({
                step: {str(score_type.name): float(score_type.score_function(truth, pred))
                       for score_type in problem.score_types}
                for step, (truth, pred) in pairs.items()})
        bagged = {"valid": _all_folds_bagged(problem, valid_bag, predictions(y_true=y_train),
                                             [valid_is for _, valid_is in folds])}
        if y_test is not None:
            bagged["test"] = _all_folds_bagged(problem, test_bag, predictions(y_true=y_test),
                                               None)
    except SubmissionError:
        raise
    except Exception as error:  # noqa: BLE001 - predictions of the wrong shape
        raise SubmissionError(bounded(
            f"unusable results: the saved predictions cannot be scored: "
            f"{type(error).__name__}: {error}")) from None
    return folds_scored, bagged


def _all_folds_bagged(problem: Any, predictions: list, truth: Any,
                      test_is: list | None) -> dict[str, float]:
    """Each score type's score of all folds bagged: the last of the scores rampwf's
    ``get_score_cv_bags`` computes, the same way, without the first k - 1 bags nobody
    checks and with the folds combined once for all score types (a third of the time)."""
    kind = type(truth)
    if test_is is None:  # bag the full prediction vectors
        test_is = [range(len(prediction.y_pred)) for prediction in predictions]
    bags = [kind(n_samples=len(truth.y_pred)) for _ in predictions]
    for bag, prediction, indexes in zip(bags, predictions, test_is, strict=True):
        bag.set_valid_in_train(prediction, indexes)
    combined = kind.combine(bags)
    valid = combined.valid_indexes
    truth = copy.deepcopy(truth)
    truth.set_slice(valid)
    combined.set_slice(valid)
    return {str(score_type.name): float(score_type.score_function(truth, combined))
            for score_type in problem.score_types}


def _check_npz(path: Path, max_bytes: int) -> None:
    """Refuse a prediction archive that is a link or unpacks to more than ``max_bytes``."""
    try:
        info = os.lstat(path)
    except OSError:
        return  # a kit with its own load_y_pred may store predictions otherwise
    if not stat.S_ISREG(info.st_mode):
        raise SubmissionError(f"unusable results: {path.name} is not a regular file")
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(member.file_size for member in archive.infolist())
    except (zipfile.BadZipFile, OSError) as error:
        raise SubmissionError(f"unusable results: {path.parent.name}/{path.name}: {error}") \
            from None
    if unpacked > max_bytes:
        raise SubmissionError(f"unusable results: {path.parent.name}/{path.name} unpacks to "
                              f"{unpacked} bytes, more than output_limit_mb")
