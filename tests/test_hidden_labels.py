"""Hidden test labels, the split itself (runner/blinded.py outside, runner/ingest.py inside):
the scores equal ramp-test's to the last digit on kits of three shapes; the blinded folder
holds no test label; predictions the run wrote are checked before they are loaded."""

from __future__ import annotations

import csv
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runner import blinded, ingest
from runner.config import load_event_config
from runner.errors import SubmissionError
from runner.ledger import Ledger
from tests import kits
from tests.events import EXAMPLE, make_event
from tests.faults.helpers import dispatch
from tests.label_reader import label_reader

BIN = Path(sys.executable).parent


def iris_kit(root: Path) -> tuple[Path, Path, Path]:
    """The example kit, its data prepared, and its random_forest submission."""
    shutil.copytree(EXAMPLE / "ramp-kits" / "iris", root / "kit",
                    ignore=shutil.ignore_patterns("training_output", "__pycache__"))
    data = root / "data"
    data.mkdir()
    shutil.copy(EXAMPLE / "ramp-data" / "iris" / "prepare_data.py", data)
    subprocess.run([sys.executable, "prepare_data.py"], cwd=data, check=True,
                   capture_output=True)
    shutil.copytree(EXAMPLE / "submissions" / "random_forest",
                    root / "submissions" / "starting_kit")
    return root / "kit", data, root / "submissions"


KITS = {"iris": iris_kit, "regression": kits.regression_kit, "dataframe": kits.dataframe_kit}


def ramp_test(kit: Path, data: Path, submissions: Path) -> Path:
    """ramp-test's own training_output of the kit's starting_kit."""
    subprocess.run([BIN / "ramp-test", "--submission", "starting_kit", "--ramp-kit-dir", kit,
                    "--ramp-data-dir", data, "--ramp-submission-dir", submissions,
                    "--save-output", "--ignore-warning"], check=True, capture_output=True)
    return submissions / "starting_kit" / "training_output"


def ingest_run(kit: Path, folder: Path, submissions: Path) -> subprocess.CompletedProcess:
    """The ingestion program, as the sandbox runs it."""
    return subprocess.run([sys.executable, ingest.__file__, "--kit", kit, "--data", folder,
                           "--submissions", submissions, "--submission", "starting_kit"],
                          capture_output=True, text=True)


def blinded_scores(root: Path, kit: Path, data: Path, submissions: Path) -> Path:
    """The training_output ramp-runner writes through the ingestion/scoring split."""
    prepared = blinded.prepare(kit, data, root / "cache")
    copy = root / "blind-submissions"
    shutil.copytree(submissions / "starting_kit", copy / "starting_kit",
                    ignore=shutil.ignore_patterns("training_output"))
    completed = ingest_run(kit, prepared.folder, copy)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    output = root / "scored"
    blinded.score(kit, data, prepared, copy / "starting_kit" / "training_output", output)
    return output


def table(path: Path, drop: str | None = None) -> list[list[str]]:
    """A CSV file's cells as written, without the column ``drop``."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    keep = [i for i, name in enumerate(rows[0]) if name != drop]
    return [[row[i] for i in keep] for row in rows]


@pytest.mark.parametrize("shape", list(KITS))
def test_scores_equal_ramp_tests_to_the_last_digit(tmp_path, shape):
    kit, data, submissions = KITS[shape](tmp_path)
    theirs = ramp_test(kit, data, submissions)
    ours = blinded_scores(tmp_path, kit, data, submissions)
    folds = sorted(p.name for p in theirs.glob("fold_*"))
    assert folds == sorted(p.name for p in ours.glob("fold_*")) and folds
    for fold in folds:  # every score of every step; the times are each run's own
        assert table(ours / fold / "scores.csv", drop="time") == \
            table(theirs / fold / "scores.csv", drop="time")
        assert (ours / fold / "state.txt").read_text() == "scored"
    assert table(ours / "bagged_scores.csv") == table(theirs / "bagged_scores.csv")


def test_the_blinded_folder_holds_the_test_inputs_and_no_test_label(tmp_path):
    kit, data, _ = kits.dataframe_kit(tmp_path)
    folder = blinded.prepare(kit, data, tmp_path / "cache").folder
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [ingest.TRAIN_FILE, ingest.TEST_INPUTS_FILE, ingest.FOLDS_FILE])
    with open(folder / ingest.TEST_INPUTS_FILE, "rb") as handle:
        test_inputs = pickle.load(handle)
    test = (data / "data" / "test.csv").read_text().splitlines()
    assert list(test_inputs.columns) == test[0].split(",")[:-1]  # all but "target"
    assert len(test_inputs) == len(test) - 1
    for path in folder.iterdir():  # not even as text: no file names the test target
        assert b"target" not in path.read_bytes() or path.name == ingest.TRAIN_FILE


def test_a_second_prepare_reuses_the_folder_and_a_data_change_makes_a_new_one(tmp_path):
    kit, data, _ = kits.regression_kit(tmp_path)
    first = blinded.prepare(kit, data, tmp_path / "cache").folder
    assert blinded.prepare(kit, data, tmp_path / "cache").folder == first
    train = data / "data" / "train.csv"
    train.write_text(train.read_text() + train.read_text().splitlines()[1] + "\n")
    second = blinded.prepare(kit, data, tmp_path / "cache").folder
    assert second != first and second.is_dir()


def test_a_kit_with_its_own_prediction_files_cannot_be_split(tmp_path):
    kit, data, _ = kits.regression_kit(tmp_path)
    with open(kit / "problem.py", "a") as handle:
        handle.write("\n\ndef save_y_pred(y_pred, data_path, output_path, suffix):\n"
                     "    pass\n")
    with pytest.raises(blinded.KitNotSplittable, match="defines save_y_pred"):
        blinded.prepare(kit, data, tmp_path / "cache")


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """The example kit's blinded data and one honest run's ingestion output."""
    root = tmp_path_factory.mktemp("ingested")
    kit, data, submissions = iris_kit(root)
    prepared = blinded.prepare(kit, data, root / "cache")
    assert ingest_run(kit, prepared.folder, submissions).returncode == 0
    return kit, data, prepared, submissions / "starting_kit" / "training_output"


@pytest.mark.parametrize(("written", "why"), [
    (lambda path: np.save(path, np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True),
     "type object"),
    (lambda path: path.write_bytes(np.lib.format.magic(1, 0) + _header((10**9, 3))),
     "shape (1000000000, 3)"),
    (lambda path: path.symlink_to("/etc/passwd"), "Too many levels of symbolic links"),
], ids=["pickled objects", "a billion rows", "a link"])
def test_predictions_are_checked_before_they_are_loaded(ingested, tmp_path, written, why):
    kit, data, prepared, honest = ingested
    output = tmp_path / "training_output"
    shutil.copytree(honest, output)
    target = output / "fold_1" / "y_pred_test.npy"
    target.unlink()
    written(target)
    with pytest.raises(SubmissionError, match=f"fold_1/y_pred_test.npy: .*{re.escape(why)}"):
        blinded.score(kit, data, prepared, output, tmp_path / "scored")


def _header(shape: tuple[int, ...]) -> bytes:
    """An .npy 1.0 header claiming ``shape`` of float64, with no data after it."""
    text = f"{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}"
    text += " " * (63 - (len(text) + 10) % 64) + "\n"
    return len(text).to_bytes(2, "little") + text.encode()


def test_a_failing_submission_leaves_its_traceback_and_exit_code_1(tmp_path):
    kit, data, submissions = iris_kit(tmp_path)
    (submissions / "starting_kit" / "classifier.py").write_text(
        "class Classifier:\n    def fit(self, X, y):\n        raise ValueError('no luck')\n")
    prepared = blinded.prepare(kit, data, tmp_path / "cache")
    completed = ingest_run(kit, prepared.folder, submissions)
    assert completed.returncode == 1
    assert "ValueError: no luck" in completed.stdout
    fold = submissions / "starting_kit" / "training_output" / "fold_0"
    assert "ValueError: no luck" in (fold / "error.txt").read_text()
    assert (fold / "state.txt").read_text() == "training_error"


# -- through the real dispatcher ----------------------------------------------------------


def reader_event(root: Path, worker: dict | None = None) -> Path:
    """The example event with the label reader and an honest twin of it."""
    path = make_event(root, ("starting_kit",), worker=worker)
    reader = root / "submissions" / "reader"
    reader.mkdir()
    (reader / "classifier.py").write_text(label_reader([str(root / "ramp-data" / "iris")]))
    return path


def test_the_label_reader_finds_nothing_and_is_scored_as_the_honest_model_it_is(tmp_path):
    path = reader_event(tmp_path)
    completed = dispatch(path)
    assert completed.returncode == 0, completed.stderr
    config = load_event_config(path)
    with Ledger(config.ledger_path) as ledger:
        reader = ledger.get("reader")
    assert reader.state == "scored", reader.error_msg
    log = (Path(config.worker.logs_dir) / "reader" / "log").read_text()
    assert "NO LABELS FOUND" in log and "LABELS FOUND:" not in log
    assert reader.scores["test"]["acc"] < 1


def test_with_hidden_test_labels_off_the_same_reader_ranks_first(tmp_path):
    """The attack is real: without the split, ramp-test hands it the labels."""
    path = reader_event(tmp_path, worker={"hidden_test_labels": "off"})
    assert dispatch(path).returncode == 0
    with Ledger(load_event_config(path).ledger_path) as ledger:
        reader = ledger.get("reader")
    assert reader.state == "scored" and reader.scores["test"]["acc"] == 1
