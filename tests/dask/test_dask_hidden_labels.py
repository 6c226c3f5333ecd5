"""Hidden test labels on a Dask cluster (tests/real_parts.py's ``plain_cluster``: ``dask
scheduler`` and ``dask worker`` processes in a folder of their own, running the stand-in
conda environment ``ramp-iris``), through the real dispatcher: the label reader finds no
test label anywhere it can read, on a kit that keeps a copy of its data inside as many RAMP
kits do, and is scored exactly as its honest twin; with the labels not hidden the same
reader ranks first, so the attack is real. That honest submissions get ramp-test's scores
on Dask is tests/dask/test_dask_worker.py's comparison with the local ramp-test event."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from runner.config import load_event_config
from runner.dispatcher import prepare_data
from tests.dask import helpers as h
from tests.events import make_event
from tests.label_reader import label_reader


def reader_event(root: Path, cluster, **worker) -> tuple[Path, Path]:
    """The example event on ``cluster`` with the label reader (``reader``) and its honest
    twin (``honest``: the same model, never looking); its kit holds a copy of the data."""
    path = make_event(root, ("starting_kit",), worker={
        "worker_type": "dask", "dask_scheduler": cluster.address, "conda_env": "ramp-iris",
        "timeout": 60, **worker})
    config = load_event_config(path)
    prepare_data(config.worker.data_dir)
    shutil.copytree(Path(config.worker.data_dir) / "data", Path(config.worker.kit_dir) / "data")
    # Where the dispatcher keeps the labels, in case the Dask workers share its disk.
    source = label_reader([config.worker.data_dir, config.worker.kit_dir])
    h.add_submission(path, "reader", source)
    h.add_submission(path, "honest", source.replace("LABELS = _find_labels()", "LABELS = None"))
    return path, Path(config.worker.logs_dir)


@pytest.fixture(scope="module")
def hidden(plain_cluster, tmp_path_factory):
    """The reader event dispatched with the default ``hidden_test_labels`` (auto):
    (ledger rows, logs folder)."""
    path, logs = reader_event(tmp_path_factory.mktemp("dask-hidden") / "event", plain_cluster)
    return h.dispatch(path), logs


def test_the_label_reader_finds_no_label_on_the_dask_worker(hidden):
    rows, logs = hidden
    assert rows["reader"].state == "scored", rows["reader"].error_msg
    log = (logs / "reader" / "log").read_text()
    assert "NO LABELS FOUND" in log and "LABELS FOUND:" not in log
    # It looked where the task put the data and the kit on the Dask worker.
    assert log.count("ramp-runner-cache/") >= 2, log


def test_the_label_reader_is_scored_as_its_honest_twin(hidden):
    rows, _ = hidden
    assert rows["honest"].state == rows["starting_kit"].state == "scored"
    assert rows["reader"].scores == rows["honest"].scores
    assert rows["reader"].scores["test"]["acc"] < 1


def test_with_hidden_test_labels_off_the_reader_ranks_first_on_dask(plain_cluster, tmp_path):
    path, logs = reader_event(tmp_path / "event", plain_cluster, hidden_test_labels="off")
    rows = h.dispatch(path)
    assert rows["reader"].state == "scored", rows["reader"].error_msg
    assert "LABELS FOUND:" in (logs / "reader" / "log").read_text()
    assert rows["reader"].scores["test"]["acc"] == 1
    assert rows["honest"].scores["test"]["acc"] < 1
