"""A submission that fails in fit, so that its log holds a traceback."""


class Classifier:
    def fit(self, X, y):
        raise RuntimeError(
            "raising_error: this submission fails on purpose in fit() "
            f"(got X of shape {X.shape})"
        )

    def predict_proba(self, X):
        raise RuntimeError("raising_error: predict_proba() is never reached")
