"""The ingestion program: train and predict with a participant's submission, without ever
seeing the test labels. It runs inside the sandbox instead of ramp-test, as

    python ingest.py --kit KIT --data BLINDED --submissions SUBS --submission NAME

Standalone on purpose (the standard library, numpy and rampwf: what every environment that
runs ramp-test has), so that it is shipped to remote hosts beside supervise.py. BLINDED is
what ramp-runner's trusted side wrote (runner/blinded.py): the training data with its
labels, the test inputs only, and the CV folds. For each fold it trains through the kit's
own workflow (``problem.workflow.train_submission`` / ``test_submission``, as ramp-test
does) and writes, in SUBS/NAME/training_output/fold_<i>/:

    y_pred_train.npy, y_pred_test.npy   the predictions, plain arrays (no pickle: the
                                        scoring side loads them with allow_pickle=False)
    train_time, valid_time, test_time   seconds
    error.txt                           the submission's traceback, when a step failed

It prints what ramp-test prints of a run (titles, the submission's own output), never a
score: it has nothing to score with. A failed step ends it with exit code 1.
"""

import argparse
import inspect
import os
import pickle
import sys
import time
import traceback

import numpy as np

# What ramp-runner's trusted side writes into the blinded data folder (runner/blinded.py).
TRAIN_FILE = "train.pkl"
TEST_INPUTS_FILE = "test_inputs.pkl"
FOLDS_FILE = "folds.npz"
OUTPUT_FOLDER = "training_output"
# What ramp-test's state.txt says of a fold whose step failed.
FAILED_STATE = {"train": "training_error", "valid": "validating_error", "test": "testing_error"}


def parse(argv):
    """The command line's options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("kit", "data", "submissions", "submission"):
        parser.add_argument(f"--{name}", required=True)
    return parser.parse_args(argv)


def load_problem(kit_dir):
    """The kit's problem.py, imported as ramp-test imports it."""
    from rampwf.utils.importing import import_module_from_source

    return import_module_from_source(os.path.join(kit_dir, "problem.py"), "problem")


def load_blinded(data_dir):
    """``(X_train, y_train, X_test, folds)`` from the blinded data folder (X_test is None for
    a problem without test data)."""
    with open(os.path.join(data_dir, TRAIN_FILE), "rb") as handle:
        X_train, y_train = pickle.load(handle)
    test_inputs = os.path.join(data_dir, TEST_INPUTS_FILE)
    X_test = None
    if os.path.exists(test_inputs):
        with open(test_inputs, "rb") as handle:
            X_test = pickle.load(handle)
    with np.load(os.path.join(data_dir, FOLDS_FILE), allow_pickle=False) as folds:
        n_folds = len(folds.files) // 2
        cv = [(folds[f"train_{i}"], folds[f"valid_{i}"]) for i in range(n_folds)]
    return X_train, y_train, X_test, cv


def as_array(y_pred, suffix):
    """The predictions as a numeric array, or a TypeError the participant can read."""
    array = np.asarray(y_pred)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"the {suffix} predictions are not numbers (dtype {array.dtype}): "
                        "test_submission must return a numeric array")
    return array


class StepFailed(Exception):
    """A step of the submission failed; its traceback was printed and saved."""


def run_step(fold_dir, step, function, *arguments):
    """``function(*arguments)`` and its duration in seconds; on an exception, print the
    traceback and save it in ``error.txt``, as ramp-test does, and raise StepFailed."""
    started = time.time()
    try:
        result = function(*arguments)
    except Exception:  # noqa: BLE001 - the participant's code may raise anything
        trace = traceback.format_exc()
        print(trace, flush=True)
        with open(os.path.join(fold_dir, "error.txt"), "w") as handle:
            handle.write(trace)
        with open(os.path.join(fold_dir, "state.txt"), "w") as handle:
            handle.write(FAILED_STATE[step])
        raise StepFailed(step) from None
    return result, time.time() - started


def ingest(kit_dir, data_dir, submissions_dir, submission):
    """Train and predict on every fold; write predictions and times (see the module)."""
    problem = load_problem(kit_dir)
    X_train, y_train, X_test, cv = load_blinded(data_dir)
    workflow = problem.workflow
    module_path = os.path.join(submissions_dir, submission)
    print(f"Training {module_path} ...", flush=True)
    output = os.path.join(module_path, OUTPUT_FOLDER)
    os.makedirs(output, exist_ok=True)
    # As rampwf: a test_submission(model, X, fold) is handed the fold.
    parameters = list(inspect.signature(workflow.test_submission).parameters)
    fold_passed = len(parameters) == 3 and parameters[2] == "fold"

    def predict(model, X, fold, suffix):
        arguments = (fold,) if fold_passed else ()
        return as_array(workflow.test_submission(model, X, *arguments), suffix)

    for i, fold in enumerate(cv):
        fold_dir = os.path.join(output, f"fold_{i}")
        os.makedirs(fold_dir, exist_ok=True)
        print(f"CV fold {i}", flush=True)
        times, predictions = {}, {}
        model, times["train"] = run_step(fold_dir, "train", workflow.train_submission,
                                         module_path, X_train, y_train, fold[0])
        predictions["train"], times["valid"] = run_step(fold_dir, "valid", predict, model,
                                                        X_train, fold, "train")
        if X_test is not None:
            predictions["test"], times["test"] = run_step(fold_dir, "test", predict, model,
                                                          X_test, None, "test")
        for suffix, array in predictions.items():
            np.save(os.path.join(fold_dir, f"y_pred_{suffix}.npy"), array, allow_pickle=False)
        for step, seconds in times.items():
            with open(os.path.join(fold_dir, f"{step}_time"), "w") as handle:
                handle.write(repr(seconds))


def main(argv):
    """Run the ingestion; exit 1 when a step of the submission failed."""
    options = parse(argv)
    try:
        ingest(options.kit, options.data, options.submissions, options.submission)
    except StepFailed:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
