"""A submission that never finishes, to test the timeout kill.

fit() forks a child that sleeps forever, then sleeps itself far past any sane
timeout: after the kill, neither process may survive. ramp-workflow rejects
source naming process or file functions, so the module and function names are
assembled at run time.
"""

import importlib

# Far past the example event's timeout, yet finite, so a broken kill cannot leak a
# process forever on a developer's machine.
HANG_SECONDS = 3600


def _function(module, *parts):
    return getattr(importlib.import_module(module), "".join(parts))


class Classifier:
    def fit(self, X, y):
        sleep = _function("time", "sl", "eep")
        pid = _function("o" + "s", "fo", "rk")()
        if pid == 0:
            # The child: sleeps "forever" (ten times the parent), exits without cleanup.
            sleep(10 * HANG_SECONDS)
            _function("o" + "s", "_ex", "it")(0)
        sleep(HANG_SECONDS)
        return self

    def predict_proba(self, X):
        raise RuntimeError("hanging: predict_proba() is never reached")
