"""The kit's own scoring: its score types, and a run's fold and bagged scores recomputed from
the predictions it saved, to refuse scores it forged.

The submission's code runs in the same process as ramp-test, so an atexit hook (or a
thread) can rewrite bagged_scores.csv after ramp-test wrote it: no file mode or sandbox
can make a file unwritable to the very process that wrote it. The honest check is the
other one: the scores are recomputed here, outside the sandbox, with the kit's own
score types, folds and ground truth, from the predictions the run saved, and a run whose
scores differ is refused. (The predictions themselves are the run's to make: ramp-test
hands the test data to the submission's process, as RAMP does.)
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import stat
import threading
import zipfile
from pathlib import Path
from typing import Any

from runner.errors import SubmissionError
from runner.ramptest import bounded
from runner.training_output import (
    BAGGED_SCORES_FILE,
    FOLD_PREFIX,
    FOLD_SCORES_FILE,
    RunResults,
    Scores,
    ScoreType,
    read_results,
)

logger = logging.getLogger("runner.rescoring")

# Scores recomputed from the predictions and those ramp-test wrote agree to this.
SCORE_TOLERANCE = 1e-9
# A fold's predictions hold one row per sample and at most this many values per row
# (classes, outputs): what is loaded is bounded by the kit's ground truth, not by the run.
MAX_VALUES_PER_ROW = 100_000
# Collecting threads and the warm-up load a kit's problem and ground truth once, not each
# its own copy while the first load runs.
_LOADING = threading.RLock()


def score_types(kit_dir: str | os.PathLike[str]) -> tuple[ScoreType, ...]:
    """Return the score types of the kit's problem.py, in its order (the first ranks)."""
    problem_file = Path(kit_dir) / "problem.py"
    if not problem_file.is_file():
        raise ValueError(f"{problem_file}: no problem.py in the kit")
    problem = kit_problem(str(kit_dir))
    found = getattr(problem, "score_types", None)
    if not found:
        raise ValueError(f"{problem_file}: defines no score_types")
    return tuple(
        ScoreType(name=str(st.name), lower_is_better=bool(st.is_lower_the_better))
        for st in found
    )


def kit_problem(kit_dir: str) -> Any:
    """The kit's problem.py, loaded once per kit (rampwf's own loading)."""
    with _LOADING:
        return _load_problem(kit_dir)


@functools.lru_cache(maxsize=4)
def _load_problem(kit_dir: str) -> Any:
    # Imported here: rampwf pulls in scikit-learn, which only the kit's problem needs.
    from rampwf.utils import assert_read_problem

    return assert_read_problem(kit_dir)


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
        problem, y_train, y_test, folds = ground_truth(str(kit_dir), str(data_dir))
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
        ground_truth(str(kit_dir), str(data_dir))
        from rampwf.utils.io import load_y_pred  # noqa: F401 - imported for its cost
    except Exception as error:  # noqa: BLE001 - verify_results says it, once, if it lasts
        logger.debug("warming the scoring code of %s failed: %s", kit_dir, error)


@functools.cache
def _unverified(kit_dir: str, why: str) -> None:
    logger.warning("scores are not recomputed from the predictions (%s: %s): a submission "
                   "could forge them", kit_dir, why)


def ground_truth(kit_dir: str, data_dir: str) -> tuple[Any, Any, Any, list]:
    """The kit's problem, its targets and folds, as ramp-test computes them."""
    with _LOADING:
        return _load_ground_truth(kit_dir, data_dir)


@functools.lru_cache(maxsize=4)
def _load_ground_truth(kit_dir: str, data_dir: str) -> tuple[Any, Any, Any, list]:
    problem = kit_problem(kit_dir)
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
    import numpy as np
    from rampwf.utils.io import load_y_pred

    def load(fold_dir: Path, suffix: str) -> Any:
        _check_npz(fold_dir / f"y_pred_{suffix}.npz", max_bytes, shapes[suffix])
        try:
            return load_y_pred(problem, data_path=data_dir, input_path=str(fold_dir),
                               suffix=suffix)
        except Exception as error:  # noqa: BLE001 - a prediction file is the run's
            raise SubmissionError(bounded(
                f"unusable results: {fold_dir.name}/y_pred_{suffix}: "
                f"{type(error).__name__}: {error}")) from None

    predictions = problem.Predictions
    shapes = {"train": np.asarray(predictions(y_true=y_train).y_pred).shape}
    if y_test is not None:
        shapes["test"] = np.asarray(predictions(y_true=y_test).y_pred).shape
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


def _check_npz(path: Path, max_bytes: int, expected_shape: tuple[int, ...]) -> None:
    """Refuse a prediction archive that is a link, unpacks to more than ``max_bytes``, or
    holds anything but the one array ``y_pred`` ramp-test saves, of the shape the ground
    truth implies (its header is read, not its data)."""
    where = f"{path.parent.name}/{path.name}"
    try:
        info = os.lstat(path)
    except OSError:
        return  # a kit with its own load_y_pred may store predictions otherwise
    if not stat.S_ISREG(info.st_mode):
        raise SubmissionError(f"unusable results: {path.name} is not a regular file")
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            unpacked = sum(member.file_size for member in members)
            if unpacked > max_bytes:
                raise SubmissionError(f"unusable results: {where} unpacks to {unpacked} "
                                      "bytes, more than output_limit_mb")
            if [member.filename for member in members] != ["y_pred.npy"]:
                raise SubmissionError(f"unusable results: {where}: expected the one array "
                                      "y_pred that ramp-test saves")
            with archive.open("y_pred.npy") as member:
                check_predictions_header(member, expected_shape, where)
    except (zipfile.BadZipFile, OSError) as error:
        raise SubmissionError(f"unusable results: {where}: {error}") from None


def check_predictions_header(handle: Any, expected_shape: tuple[int, ...], where: str) -> None:
    """Refuse predictions whose .npy header, read from ``handle`` at the array's start, is
    not numbers of ``expected_shape`` (rows as in the ground truth, at most
    ``MAX_VALUES_PER_ROW`` values a row): before any of the data is read."""
    import numpy as np

    readers = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}
    try:
        reader = readers.get(np.lib.format.read_magic(handle))
        if reader is None:
            raise ValueError("not an .npy array of format 1.0 or 2.0")
        shape, _, dtype = reader(handle)
    except ValueError as error:
        raise SubmissionError(f"unusable results: {where}: {error}") from None
    if (dtype.kind not in "biuf" or len(shape) != len(expected_shape)
            or shape[:1] != expected_shape[:1] or math.prod(shape[1:]) > MAX_VALUES_PER_ROW):
        raise SubmissionError(f"unusable results: {where}: an array of shape {shape} and "
                              f"type {dtype}, expected shape {expected_shape} of numbers")
