"""Hidden test labels on an SSH host (the real sshd of tests/sshd.py): the blinded data
is sent to the host once and bound into the run's sandbox, the host's own data folder
(labels included, as on an AMI) is hidden from the run, and the labels stay with the
dispatcher, which scores."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from runner.config import load_event_config
from runner.dispatcher import Dispatcher
from runner.ledger import Ledger
from runner.ssh.remote_worker import BLINDED_FOLDER, RUN_FOLDER
from tests.events import make_event
from tests.label_reader import label_reader
from tests.sshd import remote_dispatcher, ssh_worker_section


@pytest.fixture(scope="module")
def dispatched(sshd, remote_kit, tmp_path_factory):
    """An SSH event with the label reader and the starting kit, run by the real
    dispatcher: (config, ledger rows, the host's kit folder)."""
    kit = tmp_path_factory.mktemp("hidden-host") / "iris"
    # Without what earlier tests' runs left in the shared host kit.
    shutil.copytree(remote_kit, kit, ignore=shutil.ignore_patterns(BLINDED_FOLDER, RUN_FOLDER))
    root = tmp_path_factory.mktemp("hidden-remote")
    path = make_event(root / "event", ("starting_kit",),
                      worker=ssh_worker_section(sshd, kit, timeout=60,
                                                hidden_test_labels="auto"),
                      dispatcher=remote_dispatcher())
    reader = path.parent / "submissions" / "reader"
    reader.mkdir()
    (reader / "classifier.py").write_text(label_reader([str(kit), str(kit / "data")]))
    config = load_event_config(path)
    Dispatcher(config).run()
    with Ledger(config.ledger_path) as ledger:
        rows = {row.name: row for row in ledger.all()}
    return config, rows, kit


def test_the_label_reader_finds_nothing_on_the_host(dispatched):
    config, rows, _ = dispatched
    assert rows["reader"].state == "scored", rows["reader"].error_msg
    log = (Path(config.worker.logs_dir) / "reader" / "log").read_text()
    assert "NO LABELS FOUND" in log and "LABELS FOUND:" not in log
    assert rows["reader"].scores["test"]["acc"] < 1


def test_honest_runs_are_scored_and_the_blinded_data_was_sent_once(dispatched):
    _, rows, kit = dispatched
    assert rows["starting_kit"].state == "scored", rows["starting_kit"].error_msg
    sent = sorted(p.name for p in (kit / BLINDED_FOLDER).iterdir())
    assert len(sent) == 2 and sent[0].startswith("blinded-") and sent[1] == "ingest.py"
    assert (kit / "data" / "test.csv").is_file()  # the host keeps its data; runs do not see it
