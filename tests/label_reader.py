"""A submission of the example kit that looks for the test labels (data/test.csv) in the
data and kit folders its command line names and where the event keeps them, and, when it
finds them, returns the true classes from predict_proba: ranked first with accuracy 1 where
the labels are in reach. It prints what it found, as LABELS FOUND: <path> or NO LABELS FOUND."""

from __future__ import annotations

SOURCE = '''
import importlib
import sys

import numpy as np
import pandas as pd
from sklearn.ensemble import RandomForestClassifier

CLASSES = ["setosa", "versicolor", "virginica"]
GUESSED = {guessed!r}


def _find_labels():
    path = importlib.import_module("o" + "s").path
    candidates = list(GUESSED)
    # The data folder it is handed, and the kit's (many RAMP kits keep a data/ inside).
    for flag in ("--ramp-data-dir", "--data", "--ramp-kit-dir", "--kit"):
        if flag in sys.argv:
            candidates.append(sys.argv[sys.argv.index(flag) + 1])
    for folder in candidates:
        for name in ("data/test.csv", "test.csv"):
            found = path.join(folder, name)
            if path.exists(found):
                try:
                    labels = pd.read_csv(found)["species"]
                except Exception:  # unreadable to this run
                    continue
                print("LABELS FOUND:", found, flush=True)
                return list(labels)
    print("NO LABELS FOUND in", candidates, flush=True)
    return None


LABELS = _find_labels()


class Classifier:
    def fit(self, X, y):
        self.model = RandomForestClassifier(n_estimators=10, random_state=0).fit(X, y)

    def predict_proba(self, X):
        if LABELS is not None and len(X) == len(LABELS):
            return np.array([[float(label == c) for c in CLASSES] for label in LABELS])
        return self.model.predict_proba(X)
'''


def label_reader(guessed_data_dirs: list[str]) -> str:
    """The classifier.py of the label-reading submission."""
    return SOURCE.format(guessed=guessed_data_dirs)
