"""runner.ramptest, training_output and rescoring: the command line, the child environment,
parsing real ramp-test output and recomputing its scores.

The parsing tests run the real ramp-test (ramp-workflow) once per session on a temporary
copy of the example iris event, so the repository stays clean.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from runner import ramptest, rescoring, training_output
from runner.errors import SubmissionError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "iris"
# ramp-test is installed beside the interpreter running the tests (same venv).
BIN_DIR = Path(sys.executable).parent
GOOD = ("starting_kit", "random_forest")


def test_command_is_the_documented_ramp_test_line():
    argv = ramptest.command("rf", "/kit", "/data", "/subs", ramp_test="/env/bin/ramp-test")
    assert argv == [
        "/env/bin/ramp-test", "--submission", "rf", "--ramp-kit-dir", "/kit",
        "--ramp-data-dir", "/data", "--ramp-submission-dir", "/subs",
        "--save-output", "--ignore-warning",
    ]


def test_child_environment_drops_secrets_and_sets_threads():
    parent = {
        "PATH": "/usr/bin",
        "HOME": "/home/u",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "AWS_ACCESS_KEY_ID": "AKIA",
        "AWS_PROFILE": "prod",
        "GITHUB_TOKEN": "ghp_x",
    }
    env = ramptest.child_environment(3, parent=parent, extra_path="/env/bin")
    assert not [name for name in env if name.startswith("AWS_")]
    assert "GITHUB_TOKEN" not in env
    assert "s3cr3t" not in env.values()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        assert env[name] == "3"
    assert env["PATH"].split(":")[:2] == ["/env/bin", "/usr/bin"]
    assert env["HOME"] == "/home/u"


def test_child_environment_without_n_threads_sets_no_thread_variable():
    env = ramptest.child_environment(None, parent={"PATH": "/usr/bin", "OMP_NUM_THREADS": "64"})
    assert not set(ramptest.THREAD_VARIABLES) & set(env)


@pytest.fixture(scope="session")
def event(tmp_path_factory) -> Path:
    """A copy of the example event with its data prepared and two submissions run."""
    root = tmp_path_factory.mktemp("iris")
    ignore = shutil.ignore_patterns("data", "training_output", "__pycache__")
    shutil.copytree(EXAMPLE / "ramp-kits", root / "ramp-kits", ignore=ignore)
    shutil.copytree(EXAMPLE / "ramp-data", root / "ramp-data", ignore=ignore)
    for name in GOOD:
        shutil.copytree(EXAMPLE / "submissions" / name, root / "submissions" / name, ignore=ignore)
    data_dir = root / "ramp-data" / "iris"
    subprocess.run([sys.executable, "prepare_data.py"], cwd=data_dir, check=True)
    for name in GOOD:
        argv = ramptest.command(
            name, str(root / "ramp-kits" / "iris"), str(data_dir), str(root / "submissions"),
            ramp_test=str(BIN_DIR / "ramp-test"),
        )
        env = ramptest.child_environment(1, extra_path=str(BIN_DIR))
        run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
    return root


def output_of(event: Path, submission: str) -> Path:
    return event / "submissions" / submission / "training_output"


def test_score_types_follow_problem_order_and_direction():
    types = rescoring.score_types(EXAMPLE / "ramp-kits" / "iris")
    assert [t.name for t in types] == ["acc", "nll", "f1_70"]
    assert [t.lower_is_better for t in types] == [False, True, False]


def test_score_types_without_problem_raises(tmp_path):
    with pytest.raises(ValueError, match="problem.py"):
        rescoring.score_types(tmp_path)


def test_read_results_of_a_real_run(event):
    results = training_output.read_results(output_of(event, "random_forest"))
    names = {t.name for t in rescoring.score_types(event / "ramp-kits" / "iris")}
    assert len(results.fold_scores) == 3  # problem.py: StratifiedShuffleSplit(n_splits=3)
    for fold in results.fold_scores:
        assert set(fold) == {"train", "valid", "test"}
        for scores in fold.values():
            assert set(scores) == names
            assert 0.0 <= scores["acc"] <= 1.0
            assert scores["nll"] >= 0.0
    assert set(results.bagged_scores) == {"valid", "test"}
    for scores in results.bagged_scores.values():
        assert set(scores) == names
        assert 0.5 < scores["acc"] <= 1.0
    assert results.train_time > 0
    assert results.valid_time > 0
    assert results.test_time > 0


def test_bagged_scores_are_the_last_bag(event):
    out = output_of(event, "starting_kit")
    frame = pd.read_csv(out / "bagged_scores.csv")
    last = frame[(frame["step"] == "test") & (frame["n_bag"] == frame["n_bag"].max())]
    results = training_output.read_results(out)
    assert results.bagged_scores["test"]["acc"] == pytest.approx(float(last["acc"].iloc[0]))


def test_times_are_the_sum_over_folds(event):
    out = output_of(event, "starting_kit")
    expected = sum(float((out / f"fold_{i}" / "train_time").read_text()) for i in range(3))
    assert training_output.read_results(out).train_time == pytest.approx(expected)


def test_better_models_beat_the_starting_kit(event):
    kit = training_output.read_results(output_of(event, "starting_kit")).bagged_scores["test"]
    forest = training_output.read_results(output_of(event, "random_forest")).bagged_scores["test"]
    assert forest["acc"] > kit["acc"]
    assert forest["nll"] < kit["nll"]


@pytest.fixture
def output_copy(event, tmp_path) -> Path:
    copy = tmp_path / "random_forest"
    shutil.copytree(output_of(event, "random_forest"), copy)
    return copy


@pytest.mark.parametrize(
    "relative",
    ["bagged_scores.csv", "fold_1/scores.csv", "fold_2/train_time", "fold_0/test_time"],
)
def test_missing_file_is_named(output_copy, relative):
    (output_copy / relative).unlink()
    with pytest.raises(ValueError, match=f"{output_copy / relative}: missing"):
        training_output.read_results(output_copy)


def test_missing_middle_fold_is_named(output_copy):
    shutil.rmtree(output_copy / "fold_1")
    with pytest.raises(ValueError, match="fold_1: missing"):
        training_output.read_results(output_copy)


def test_no_folds_at_all(tmp_path):
    with pytest.raises(ValueError, match="fold_0: missing"):
        training_output.read_results(tmp_path)


def test_missing_output_dir(tmp_path):
    with pytest.raises(ValueError, match="no such training_output"):
        training_output.read_results(tmp_path / "nope")


@pytest.mark.parametrize(
    ("relative", "content"),
    [
        ("fold_0/scores.csv", "step,acc,time\ntrain,high,0.1\nvalid,0.9,0.1\n"),
        ("fold_0/scores.csv", "step,acc,time\ntest,0.9,0.1\n"),
        ("fold_0/scores.csv", ""),
        ("bagged_scores.csv", "step,acc\nvalid,0.9\n"),
        ("bagged_scores.csv", "step,n_bag,acc\nvalid,0,oops\n"),
        ("fold_1/valid_time", "soon\n"),
    ],
)
def test_malformed_file_is_named(output_copy, relative, content):
    (output_copy / relative).write_text(content)
    with pytest.raises(ValueError, match=f"{output_copy / relative}: malformed"):
        training_output.read_results(output_copy)


def test_failed_run_reports_the_error(tmp_path):
    fold = tmp_path / "fold_0"
    fold.mkdir()
    (fold / "state.txt").write_text("training_error")
    (fold / "error.txt").write_text("Traceback (most recent call last):\nRuntimeError: boom\n")
    with pytest.raises(ValueError, match=r"scores.csv: missing \(the run failed: .*boom"):
        training_output.read_results(tmp_path)


def test_problem_builds_the_same_split_as_prepare_data(event, monkeypatch):
    """Without data/, problem.py rebuilds the split prepare_data.py writes (bare kit runs)."""
    from rampwf.utils import assert_read_problem

    monkeypatch.delenv("RAMP_TEST_MODE", raising=False)
    problem = assert_read_problem(str(event / "ramp-kits" / "iris"))
    data_dir = event / "ramp-data" / "iris"
    for getter in (problem.get_train_data, problem.get_test_data):
        X_file, y_file = getter(path=str(data_dir))
        X_mem, y_mem = getter(path=str(event / "ramp-kits" / "iris"))  # no data/ there
        np.testing.assert_allclose(X_file, X_mem)
        assert list(y_file) == list(y_mem)


def test_bare_kit_quick_test_runs_the_starting_kit(tmp_path):
    """The AMI build's check: ramp-test --quick-test inside the kit, with no data fetched."""
    kit = tmp_path / "iris"
    shutil.copytree(
        EXAMPLE / "ramp-kits" / "iris", kit,
        ignore=shutil.ignore_patterns("data", "training_output", "__pycache__"),
    )
    env = ramptest.child_environment(1, extra_path=str(BIN_DIR))
    run = subprocess.run(
        [str(BIN_DIR / "ramp-test"), "--submission", "starting_kit", "--quick-test"],
        cwd=kit, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Bagged scores" in run.stdout


# --- strict parsing against the kit's score types, and the check of forged scores -------

IRIS_TYPES = (training_output.ScoreType("acc", False), training_output.ScoreType("nll", True),
              training_output.ScoreType("f1_70", False))


def _rewrite_bagged(copy: Path, edit) -> None:
    path = copy / "bagged_scores.csv"
    frame = pd.read_csv(path)
    edit(frame)
    frame.to_csv(path, index=False)


@pytest.mark.parametrize(("value", "words"), [
    (float("nan"), "not a finite number"),
    (float("inf"), "not a finite number"),
    ("high", "not a number"),
])
def test_strict_parse_refuses_a_score_that_is_not_a_finite_number(output_copy, value, words):
    _rewrite_bagged(output_copy, lambda frame: frame.__setitem__(
        "acc", frame["acc"].astype(object).where(frame.index != 0, value)))
    with pytest.raises(ValueError, match=words):
        training_output.read_results(output_copy, IRIS_TYPES)


def test_strict_parse_wants_every_score_of_the_kit_and_keeps_only_them(output_copy):
    _rewrite_bagged(output_copy, lambda frame: frame.__setitem__("extra", 1.0))
    results = training_output.read_results(output_copy, IRIS_TYPES)
    assert set(results.bagged_scores["test"]) == {"acc", "nll", "f1_70"}
    _rewrite_bagged(output_copy, lambda frame: frame.drop(columns=["f1_70"], inplace=True))
    with pytest.raises(ValueError, match="no column for score 'f1_70' of the kit"):
        training_output.read_results(output_copy, IRIS_TYPES)


def test_strict_parse_refuses_a_big_or_special_scores_file(output_copy):
    big = output_copy / "bagged_scores.csv"
    big.write_text("step,n_bag,acc\n" + "9" * (training_output.MAX_SCORES_BYTES + 1))
    with pytest.raises(ValueError, match="a scores file holds at most"):
        training_output.read_results(output_copy, IRIS_TYPES)
    big.unlink()
    big.symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="not a regular file"):
        training_output.read_results(output_copy, IRIS_TYPES)


def test_verify_accepts_real_scores_and_refuses_a_forged_one(event, output_copy):
    kit, data = event / "ramp-kits" / "iris", event / "ramp-data" / "iris"
    results = rescoring.verify_results(output_copy, kit, data, 2**30)
    assert results.bagged_scores == training_output.read_results(output_copy).bagged_scores
    _rewrite_bagged(output_copy, lambda frame: frame.__setitem__("acc", 1.0))
    with pytest.raises(SubmissionError, match="forged scores refused: "
                                               "bagged_scores.csv says valid acc = 1"):
        rescoring.verify_results(output_copy, kit, data, 2**30)


@pytest.mark.parametrize("step", ["train", "valid", "test"])
def test_verify_refuses_a_forged_fold_score(event, output_copy, step):
    # The per-fold scores go to the ledger and to a RAMP board's fold table as well.
    kit, data = event / "ramp-kits" / "iris", event / "ramp-data" / "iris"
    path = output_copy / "fold_1" / "scores.csv"
    frame = pd.read_csv(path, index_col=0)
    frame.loc[step, "acc"] = 0.123
    frame.to_csv(path)
    with pytest.raises(SubmissionError, match=f"forged scores refused: fold_1/scores.csv says "
                                               f"{step} acc = 0.123, but the saved predictions"):
        rescoring.verify_results(output_copy, kit, data, 2**30)


@pytest.mark.parametrize(("content", "words"), [
    ("step,n_bag,acc,nll,f1_70,acc\nvalid,0,0.9,0.1,0.5,1.0\n", "a column is named twice"),
    ("step,n_bag,acc,nll,f1_70\nvalid,0,0.9,0.1,0.5,1.0\n", "line 2 has 6 fields"),
    ("step,n_bag,acc,nll,f1_70\nvalid,0,0.9,0.1\n", "line 2 has 4 fields"),
    ("step,n_bag,acc,nll,f1_70\nvalid,0,1_0,0.1,0.5\n", "not a number"),
    (b"step,n_bag,acc,nll,f1_70\nvalid,0,0.9,0.1,\xff\n", "malformed"),
])
def test_strict_parse_refuses_ragged_or_ambiguous_tables(output_copy, content, words):
    """A score file read one way by the dispatcher and another by a person is refused."""
    path = output_copy / "bagged_scores.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=f"{path}: .*{words}"):
        training_output.read_results(output_copy, IRIS_TYPES)


def test_a_time_file_that_is_a_link_is_refused(output_copy, tmp_path):
    """A run cannot make the dispatcher read another file as its time."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("1.5\n")
    (output_copy / "fold_0" / "train_time").unlink()
    (output_copy / "fold_0" / "train_time").symlink_to(elsewhere)
    with pytest.raises(ValueError, match="fold_0/train_time: malformed, not a regular file"):
        training_output.read_results(output_copy)


def test_warm_loads_the_scoring_code_before_the_first_check(event, output_copy):
    """The dispatcher warms the kit's problem and ground truth while the first runs go:
    the first check then finds them loaded, and a kit it cannot load is not an error yet."""
    kit, data = event / "ramp-kits" / "iris", event / "ramp-data" / "iris"
    rescoring._load_ground_truth.cache_clear()
    rescoring.warm(kit, data)
    assert rescoring._load_ground_truth.cache_info().currsize == 1
    rescoring.verify_results(output_copy, kit, data, 2**30)
    assert rescoring._load_ground_truth.cache_info().hits >= 1
    rescoring.warm(event / "no-kit", data)  # nothing to load, nothing raised


# -- the error message of a failed run ------------------------------------------------------

RAISED = ("Traceback (most recent call last):\n\n"
          '  File "/kit/submissions/x/classifier.py", line 6, in fit\n'
          "    raise RuntimeError(\n\n"
          "RuntimeError: x fails\n")


def test_the_traceback_that_ends_the_log_is_the_error():
    log = "Training x ...\nCV fold 0\n" + RAISED + "\n"
    assert ramptest.traceback_of(log) == RAISED.strip()
    chained = (RAISED + f"\n{ramptest.CHAINED[1]}\n\n"
               + RAISED.replace("RuntimeError", "ValueError"))
    assert ramptest.traceback_of("CV fold 0\n" + chained) == chained.strip()


@pytest.mark.parametrize("log", [
    # A header the submission printed, then ramp-test's score rows (tab-indented).
    "Traceback (most recent call last):\n\tscore  acc\n\ttest  0.93\nCV fold 1\n",
    "Traceback (most recent call last):\n\tscore  acc\n\ttest  0.93\nValueError: x\n",
    RAISED + "\tscore  acc\n\ttest  0.93\n",
    "CV fold 2\nTraceback (most recent call last):\n",
    "",
])
def test_nothing_else_of_the_log_is_the_error(log):
    assert ramptest.traceback_of(log) == ""
    assert ramptest.error_message(log, None) == ""


def test_the_folds_error_file_comes_first():
    assert ramptest.error_message(RAISED, "OSError: from error.txt\n") == "OSError: from error.txt"


@pytest.mark.parametrize(("returncode", "line"), [
    (1, "ramp-runner: the run exited with code 1"),
    (139, "ramp-runner: the run was killed by signal SIGSEGV (exit code 139)"),
    (-9, "ramp-runner: the run was killed by signal SIGKILL (exit code -9)"),
    (255, "ramp-runner: the run exited with code 255"),  # 128 + 127: no signal
])
def test_the_exit_line_names_the_code_or_the_signal(returncode, line):
    assert ramptest.exit_message(returncode) == line
