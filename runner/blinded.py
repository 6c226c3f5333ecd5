"""Hidden test labels, the trusted side: what a participant's code may see, and how its
predictions are scored.

RAMP kits hand the private test set, labels included, to the participant's process
(ramp-test runs the submission beside ``get_test_data``). With hidden test labels the run
is split as Codabench splits it: this module, outside the sandbox, loads the organiser's
``problem.py`` and writes a *blinded* data folder (the training data with its labels, the
test inputs only, the CV folds); inside the sandbox, ``runner/ingest.py`` trains and
predicts from it, writing plain arrays; back outside, ``score`` builds from those arrays
and the labels the very ``training_output`` tree ramp-test writes, with rampwf's own
scoring functions, so that everything downstream (re-scoring, the ledger, a RAMP board)
is unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner import rescoring, training_output
from runner.config import WorkerSection
from runner.errors import EventError, SubmissionError
from runner.states import SubmissionState

logger = logging.getLogger("runner.blinded")


class KitNotSplittable(EventError):
    """The kit cannot be run with hidden test labels (it needs its data or pickles in the
    participant's process); with ``hidden_test_labels: auto`` it runs as ramp-test does."""


@dataclass(frozen=True)
class BlindedData:
    """A prepared blinded data folder and what scoring needs beside it."""

    folder: Path
    # The CV folds shipped to the run (arrays of sample indexes): scoring uses exactly these.
    folds: tuple[tuple[Any, Any], ...]
    has_test: bool


def why_not_hidden(settings: WorkerSection, runs_ingestion: bool) -> str | None:
    """Why the event's runs cannot hide their test labels (known before any data is
    loaded), or None when they can; ``hidden_test_labels: off`` needs no reason."""
    if not runs_ingestion:
        return f"worker_type {settings.worker_type} runs ramp-test itself"
    if not Path(settings.kit_dir, "problem.py").is_file() or not Path(settings.data_dir).is_dir():
        return "the kit or its data is not on the dispatcher's machine"
    return why_not_splittable(settings.kit_dir)


def not_hidden_warning(why: str) -> str:
    """What the organiser is told, once, when runs go on without hidden test labels."""
    return (f"TEST LABELS ARE NOT HIDDEN: {why}; each submission's code runs beside the test "
            "labels, as with ramp-test (set worker.hidden_test_labels: off to silence this)")


def for_event(settings: WorkerSection, runs_ingestion: bool,
              cache_dir: str | os.PathLike[str]) -> BlindedData | None:
    """The blinded data of the event's runs under worker key ``hidden_test_labels``, or
    None when they run as ramp-test does (``off``, or ``auto`` where they cannot:
    preflight said why); ``required`` where they cannot raises EventError."""
    if settings.hidden_test_labels == "off":
        return None
    why = why_not_hidden(settings, runs_ingestion)
    try:
        if why is not None:
            raise KitNotSplittable(why)
        return prepare(settings.kit_dir, settings.data_dir, cache_dir)
    except KitNotSplittable as error:
        if settings.hidden_test_labels == "required":
            raise EventError(f"worker.hidden_test_labels: required, but {error}") from None
        if why is None:  # found while loading the data: preflight could not say it
            logger.warning("%s", not_hidden_warning(str(error)))
        return None


def ingest_command(python: str, program: str, kit_dir: str | os.PathLike[str],
                   folder: str | os.PathLike[str], submissions_dir: str, submission: str
                   ) -> list[str]:
    """The command line that runs the ingestion ``program`` (runner/ingest.py, or its copy
    on a remote host) with the event environment's ``python``."""
    return [python, str(program), "--kit", str(kit_dir), "--data", str(folder),
            "--submissions", submissions_dir, "--submission", submission]


def why_not_splittable(kit_dir: str | os.PathLike[str]) -> str | None:
    """Why the kit's runs cannot hide their test labels, or None when they can."""
    problem = rescoring.kit_problem(str(kit_dir))
    for hook in ("load_y_pred", "save_y_pred"):
        if hasattr(problem, hook):
            return (f"its problem.py defines {hook}, so its predictions are not plain "
                    "arrays the scoring side can read without the kit's code in the run")
    return None


def prepare(kit_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str],
            cache_dir: str | os.PathLike[str]) -> BlindedData:
    """Write the blinded data folder for the kit and its data, once per content: a second
    call with the same problem.py and data files returns the folder already written.

    Raises KitNotSplittable (naming why) when the kit cannot hide its test labels.
    """
    kit_dir, data_dir = str(kit_dir), str(data_dir)
    why = why_not_splittable(kit_dir)
    if why is not None:
        raise KitNotSplittable(f"{kit_dir}: {why}")
    folder = Path(cache_dir) / f"blinded-{_content_digest(kit_dir, data_dir)}"
    if not folder.is_dir():
        _write_blinded(kit_dir, data_dir, folder)
        # One dispatcher per cache (the event's lock): older contents are nobody's now.
        for old in folder.parent.glob("blinded-*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
    from runner import ingest  # numpy, when there is data to read

    _, _, X_test, folds = ingest.load_blinded(str(folder))
    return BlindedData(folder=folder, folds=tuple(folds), has_test=X_test is not None)


def _content_digest(kit_dir: str, data_dir: str) -> str:
    """A digest of problem.py and every data file's name, size and change time: a changed
    file makes a new blinded folder (its contents are not read: data can be gigabytes)."""
    digest = hashlib.sha256(Path(kit_dir, "problem.py").read_bytes())
    for root, folders, files in os.walk(data_dir):
        folders.sort()
        for name in sorted(files):
            info = os.stat(os.path.join(root, name))
            digest.update(f"{os.path.relpath(os.path.join(root, name), data_dir)}\0"
                          f"{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _write_blinded(kit_dir: str, data_dir: str, folder: Path) -> None:
    """Load the kit's data as ramp-test does and write what the run may see; atomically, so
    that a folder that exists is complete."""
    import numpy as np

    from runner import ingest

    problem = rescoring.kit_problem(kit_dir)
    X_train, y_train = problem.get_train_data(path=data_dir)
    try:
        X_test, _ = problem.get_test_data(path=data_dir)
    except (FileNotFoundError, OSError):
        X_test = None
    try:
        folds = {f"{part}_{i}": np.asarray(indexes, dtype=np.int64)
                 for i, fold in enumerate(problem.get_cv(X_train, y_train))
                 for part, indexes in zip(("train", "valid"), fold, strict=True)}
        if any(indexes.ndim != 1 for indexes in folds.values()):
            raise ValueError("a fold is not a one-dimensional array of indexes")
    except (TypeError, ValueError) as error:
        raise KitNotSplittable(f"{kit_dir}: its get_cv does not give "
                               f"folds of sample indexes ({error})") from None
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".blinded-", dir=folder.parent))
    try:
        # Pickles made here, by the organiser's own code, are read by the run: never the
        # other way round (the run's predictions come back as plain arrays).
        with open(staging / ingest.TRAIN_FILE, "wb") as handle:
            pickle.dump((X_train, y_train), handle, protocol=pickle.HIGHEST_PROTOCOL)
        if X_test is not None:
            with open(staging / ingest.TEST_INPUTS_FILE, "wb") as handle:
                pickle.dump(X_test, handle, protocol=pickle.HIGHEST_PROTOCOL)
        np.savez(staging / ingest.FOLDS_FILE, **folds)
        # Readable by the run's own uid (the sandbox drops root), writable by nobody.
        for path in (staging, *staging.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)
        staging.rename(folder)
    except FileExistsError:  # another dispatcher wrote the same content meanwhile
        shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("blinded data for %s written to %s", kit_dir, folder)


def score(kit_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str],
          blinded: BlindedData, predictions_dir: str | os.PathLike[str],
          output_dir: str | os.PathLike[str]) -> None:
    """Write into ``output_dir`` the training_output tree ramp-test would have written for
    the run whose ingestion left ``predictions_dir`` (its training_output folder).

    The predictions are the run's: each file's header is checked against the shape the
    kit's ground truth implies before anything is loaded, and what does not fit is the
    submission's SubmissionError.
    """
    import numpy as np
    from rampwf.utils.combine import get_score_cv_bags
    from rampwf.utils.scoring import score_matrix

    problem, y_train, y_test, _ = rescoring.ground_truth(str(kit_dir), str(data_dir))
    predictions = problem.Predictions
    truth = {"train": predictions(y_true=y_train)}
    if blinded.has_test:
        truth["test"] = predictions(y_true=y_test)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    bags: dict[str, list] = {step: [] for step in truth}
    for i, (train_is, valid_is) in enumerate(blinded.folds):
        source = Path(predictions_dir) / f"fold_{i}"
        target = output_dir / f"fold_{i}"
        target.mkdir()
        y_pred = {suffix: _load_predictions(source, suffix, truth[suffix])
                  for suffix in truth}
        steps = {"train": ("train", train_is), "valid": ("train", valid_is)}
        if blinded.has_test:
            steps["test"] = ("test", None)
        fold_truth, fold_predictions = {}, {}
        for step, (suffix, indexes) in steps.items():
            y_true = y_train if suffix == "train" else y_test
            fold_truth[step] = predictions(y_true=y_true, fold_is=indexes)
            fold_predictions[step] = predictions(y_pred=y_pred[suffix], fold_is=indexes)
        bags["train"].append(fold_predictions["valid"])
        if blinded.has_test:
            bags["test"].append(fold_predictions["test"])
        times = [_read_seconds(source, step) for step in steps]
        scores = score_matrix(problem.score_types, fold_truth, fold_predictions)
        scores["time"] = times
        for suffix, array in y_pred.items():
            np.savez_compressed(target / f"y_pred_{suffix}", y_pred=array)
        for step, seconds in zip(steps, times, strict=True):
            (target / f"{step}_time").write_text(str(seconds))
        scores.to_csv(target / training_output.FOLD_SCORES_FILE)
        # RAMP names a fold's states as it names a submission's.
        (target / "state.txt").write_text(SubmissionState.SCORED)
    _write_bagged_scores(output_dir / training_output.BAGGED_SCORES_FILE, problem, truth, bags,
                         [valid_is for _, valid_is in blinded.folds], get_score_cv_bags)


def _load_predictions(fold_dir: Path, suffix: str, truth: Any) -> Any:
    """The run's ``y_pred_<suffix>.npy``, its header checked before its data is read."""
    import numpy as np

    where = f"{fold_dir.name}/y_pred_{suffix}.npy"
    try:
        with open(fold_dir / f"y_pred_{suffix}.npy", "rb", opener=_no_follow) as handle:
            rescoring.check_predictions_header(handle, np.asarray(truth.y_pred).shape, where)
            handle.seek(0)
            return np.load(handle, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise SubmissionError(f"unusable results: {where}: {error}") from None


def _no_follow(path: str, flags: int) -> int:
    """Open without following a link, and without blocking on a FIFO the run left."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)


def _read_seconds(fold_dir: Path, step: str) -> float:
    try:
        return training_output.read_time(str(fold_dir / f"{step}_time"), required=True)
    except ValueError as error:
        raise SubmissionError(f"unusable results: {error}") from None


def _write_bagged_scores(path: Path, problem: Any, truth: dict[str, Any],
                         bags: dict[str, list], valid_indexes: Sequence,
                         get_score_cv_bags: Any) -> None:
    """bagged_scores.csv as rampwf's ``bag_submissions`` writes it (which also prints the
    scores to stdout, the dispatcher's terminal: hence this copy of its table)."""
    import pandas as pd

    table = {}
    for step, suffix in (("valid", "train"), ("test", "test")):
        if suffix not in truth:
            continue
        indexes = list(valid_indexes) if step == "valid" else None
        table[step] = pd.DataFrame({
            score_type.name: dict(enumerate(get_score_cv_bags(
                score_type, bags[suffix], truth[suffix], test_is_list=indexes)[1]))
            for score_type in problem.score_types})
    scores = pd.concat(table)
    scores.columns = scores.columns.rename("score")
    scores.index = scores.index.rename(["step", "n_bag"])
    scores.to_csv(path)
