"""Small RAMP kits of other shapes than the example's, written into a test's folder: a
regression kit whose X is an array (rampwf's Regressor workflow) and a binary classification
kit whose X is a DataFrame with a text column (rampwf's Estimator workflow). Their data are
scikit-learn's bundled data sets, split by the test (no download)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.model_selection import train_test_split

_READ_CSV = '''
def _read(path, split):
    data = pd.read_csv(os.path.join(path, "data", f"{split}.csv"))
    y = data.pop("target").to_numpy()
    return {X}, y


def get_train_data(path="."):
    return _read(path, "train")


def get_test_data(path="."):
    return _read(path, "test")
'''

REGRESSION_PROBLEM = '''
import os

import pandas as pd
import rampwf as rw
from sklearn.model_selection import KFold

problem_title = "Diabetes progression (regression, X an array)"
Predictions = rw.prediction_types.make_regression()
workflow = rw.workflows.Regressor()
score_types = [
    rw.score_types.RMSE(name="rmse", precision=3),
    rw.score_types.RelativeRMSE(name="rel_rmse", precision=3),
]


def get_cv(X, y):
    return KFold(n_splits=3, shuffle=True, random_state=3).split(X)
''' + _READ_CSV.replace("{X}", "data.to_numpy(dtype=float)")

REGRESSION_SUBMISSION = ("regressor.py", '''
from sklearn.base import BaseEstimator
from sklearn.linear_model import Ridge


class Regressor(BaseEstimator):
    def fit(self, X, y):
        self.model = Ridge(alpha=0.5).fit(X, y)
        return self

    def predict(self, X):
        return self.model.predict(X)
''')

FRAME_PROBLEM = '''
import os

import pandas as pd
import rampwf as rw
from sklearn.model_selection import StratifiedShuffleSplit

problem_title = "Breast cancer (binary, X a DataFrame with a text column)"
Predictions = rw.prediction_types.make_multiclass(label_names=[0, 1])
workflow = rw.workflows.Estimator()
score_types = [
    rw.score_types.ROCAUC(name="auc", precision=4),
    rw.score_types.Accuracy(name="acc", precision=3),
    rw.score_types.NegativeLogLikelihood(name="nll", precision=3),
]


def get_cv(X, y):
    return StratifiedShuffleSplit(n_splits=4, test_size=0.25, random_state=11).split(X, y)
''' + _READ_CSV.replace("{X}", "data")

FRAME_SUBMISSION = ("estimator.py", '''
from sklearn.compose import make_column_transformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler


def get_estimator():
    columns = make_column_transformer(
        (OneHotEncoder(handle_unknown="ignore"), ["site"]),
        remainder=StandardScaler())
    return make_pipeline(columns, LogisticRegression(max_iter=500))
''')


def _write_kit(root: Path, problem: str, submission: tuple[str, str], data: pd.DataFrame,
               y: np.ndarray, stratify: bool) -> tuple[Path, Path, Path]:
    kit, data_dir, submissions = root / "kit", root / "data", root / "submissions"
    (kit).mkdir(parents=True)
    (kit / "problem.py").write_text(textwrap.dedent(problem))
    (submissions / "starting_kit").mkdir(parents=True)
    (submissions / "starting_kit" / submission[0]).write_text(submission[1])
    (data_dir / "data").mkdir(parents=True)
    frame = data.assign(target=y)
    train, test = train_test_split(frame, test_size=0.3, random_state=5,
                                   stratify=y if stratify else None)
    train.to_csv(data_dir / "data" / "train.csv", index=False)
    test.to_csv(data_dir / "data" / "test.csv", index=False)
    return kit, data_dir, submissions


def regression_kit(root: Path) -> tuple[Path, Path, Path]:
    """Write the regression kit under ``root``; return (kit, data, submissions) folders."""
    data = load_diabetes(as_frame=True)
    return _write_kit(root, REGRESSION_PROBLEM, REGRESSION_SUBMISSION, data.data,
                      data.target.to_numpy(), stratify=False)


def dataframe_kit(root: Path) -> tuple[Path, Path, Path]:
    """Write the DataFrame kit under ``root``; return (kit, data, submissions) folders."""
    data = load_breast_cancer(as_frame=True)
    frame = data.data.iloc[:, :8].copy()
    # A text column, so that X is a DataFrame no array could stand for.
    frame["site"] = np.array(["north", "south", "east"])[np.arange(len(frame)) % 3]
    return _write_kit(root, FRAME_PROBLEM, FRAME_SUBMISSION, frame, data.target.to_numpy(),
                      stratify=True)
