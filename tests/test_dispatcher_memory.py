"""The dispatcher never holds untrusted bulk: a prediction archive that unpacks to a
gigabyte and a 300 MB one-line error.txt, left by real submissions after ramp-test wrote
their output, cost the dispatcher's process no more than a few hundred MB, whatever they
hold; each is its submission's training_error and the event goes on."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

from runner.config import load_event_config
from tests.events import make_event
from tests.faults.helpers import REPO, states

MIB = 1024 * 1024
# Far under what reading either file whole costs (1,119 and 1,965 MiB before), far over
# what the dispatcher needs (about 150 MiB with the kit's scoring code loaded).
DISPATCHER_PEAK_LIMIT_MIB = 300

# After ramp-test has written its output (atexit runs last), put FILE from the
# submission's own folder in place of training_output/fold_0/TARGET, and remove REMOVED.
# ramp-test refuses source naming os-level or file functions, hence the indirection.
REPLACING = '''
import atexit
import importlib

from sklearn.ensemble import RandomForestClassifier


def _replace():
    system = importlib.import_module("o" + "s")
    reader = getattr(importlib.import_module("builtins"), "op" + "en")
    here = system.path.dirname(__file__)
    fold = system.path.join(here, "training_output", "fold_0")
    for name in {removed!r}:
        getattr(system, "un" + "link")(system.path.join(fold, name))
    with reader(system.path.join(here, {source!r}), "rb") as source, \\
            reader(system.path.join(fold, {target!r}), "wb") as target:
        while chunk := source.read(1 << 20):
            target.write(chunk)


atexit.register(_replace)


class Classifier:
    def fit(self, X, y):
        self.model = RandomForestClassifier(n_estimators=5, random_state=0).fit(X, y)

    def predict_proba(self, X):
        return self.model.predict_proba(X)
'''

PEAK_OF_A_DISPATCH = textwrap.dedent("""
    import sys
    from runner.config import load_event_config
    from runner.dispatcher import Dispatcher

    Dispatcher(load_event_config(sys.argv[1])).run()
    status = open("/proc/self/status").read()
    print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
""")


def write_zip_bomb(path, unpacked_bytes: int) -> None:
    """An .npz whose y_pred.npy is ``unpacked_bytes`` of float zeros, about 1 MB packed."""
    header = {"descr": "<f8", "fortran_order": False, "shape": (unpacked_bytes // 8,)}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, \
            archive.open("y_pred.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, header)
        zeros = bytes(MIB)
        for _ in range(unpacked_bytes // MIB):
            member.write(zeros)


@pytest.fixture(scope="module")
def dispatched(tmp_path_factory):
    """One event of the example kit with both bulky submissions and a good one,
    dispatched by a real dispatcher; its final states and peak memory in MiB."""
    root = tmp_path_factory.mktemp("bulk")
    # ramp-test's path (hidden test labels read only the ingestion's .npy arrays, whose
    # headers tests/test_hidden_labels.py checks).
    path = make_event(root, ("starting_kit",), worker={"hidden_test_labels": "off"})
    bulky = {"zip_bomb": ("bomb.npz", "y_pred_test.npz", []),
             "huge_error": ("error.txt", "error.txt", ["scores.csv"])}
    for name, (source, target, removed) in bulky.items():
        folder = root / "submissions" / name
        folder.mkdir()
        (folder / "classifier.py").write_text(
            REPLACING.format(source=source, target=target, removed=removed))
    write_zip_bomb(root / "submissions" / "zip_bomb" / "bomb.npz", 1_000 * MIB)
    with open(root / "submissions" / "huge_error" / "error.txt", "wb") as handle:
        for _ in range(300):
            handle.write(b"x" * MIB)  # one line, no newline
    completed = subprocess.run([sys.executable, "-c", PEAK_OF_A_DISPATCH, str(path)],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    peak_mib = int(completed.stdout.split()[-1]) / 1024
    return states(load_event_config(path).ledger_path), peak_mib


def test_the_dispatcher_stays_small_whatever_the_runs_wrote(dispatched):
    _, peak_mib = dispatched
    assert peak_mib < DISPATCHER_PEAK_LIMIT_MIB


@pytest.mark.parametrize(("submission", "why"), [
    ("zip_bomb", "fold_0/y_pred_test.npz: an array of shape (131072000,)"),
    ("huge_error", "fold_0/scores.csv: missing (the run failed:"),
])
def test_each_bulky_result_is_its_submissions_error(dispatched, submission, why):
    final, _ = dispatched
    state, attempts, message = final[submission]
    assert (state, attempts) == ("training_error", 0)
    assert why in message and len(message) < 10_000


def test_the_event_goes_on(dispatched):
    final, _ = dispatched
    assert final["starting_kit"][0] == "scored"
