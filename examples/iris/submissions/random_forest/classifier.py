"""A random forest: a solid non-linear baseline."""

from sklearn.ensemble import RandomForestClassifier


class Classifier:
    def __init__(self):
        # n_jobs=1: the worker sets the thread budget; the forest must not add its own.
        self.model = RandomForestClassifier(
            n_estimators=100, max_depth=4, random_state=42, n_jobs=1
        )

    def fit(self, X, y):
        self.model.fit(X, y)
        return self

    def predict_proba(self, X):
        return self.model.predict_proba(X)
