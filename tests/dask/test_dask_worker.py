"""DaskWorker on real clusters: a LocalCluster with processes, and ``dask scheduler`` +
``dask worker`` subprocesses on loopback (plain and TLS) running in a folder of their own,
so that nothing the dispatcher has is reachable by path."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import distributed
import pytest
import yaml

from runner import archive
from runner.config import load_event_config
from runner.dask import task as dask_task
from runner.dask.cluster import LoopbackCluster, make_certificates
from runner.dask.worker import DaskWorker
from runner.dispatcher import prepare_data
from runner.errors import ConfigError
from runner.preflight import preflight
from tests import hostile
from tests.dask import helpers as h
from tests.dask.helpers import REPO, SECRET
from tests.events import (
    ENV_DUMP_CLASSIFIER,
    environment_in_log,
    install_fake_conda,
    make_event,
)

SUBMISSIONS = ("starting_kit", "random_forest", "gradient_boosting", "raising_error")
DISPATCHER = """
import sys
from runner.config import load_event_config
from runner.dask.worker import DaskWorker
config = load_event_config(sys.argv[1])
DaskWorker(config.worker_dict(), "hanging").launch()
"""

# The clusters (local_cluster, plain_cluster, tls_cluster) are tests/real_parts.py's,
# started once per module.


@pytest.fixture(scope="module")
def local_scores(tmp_path_factory):
    """The ledger rows of the example submissions run by the local (conda) worker with
    ramp-test itself: the Dask runs, which hide the test labels, must score as it does."""
    root = tmp_path_factory.mktemp("local-event")
    path = make_event(root / "event", submissions=SUBMISSIONS,
                      worker={"hidden_test_labels": "off"})
    with pytest.MonkeyPatch.context() as patch:
        conda = install_fake_conda(root / "conda-bin", {})
        patch.delenv("CONDA_EXE", raising=False)
        patch.setenv("PATH", f"{conda.parent}:{os.environ['PATH']}")
        return h.dispatch(path)


def _dask_event(root: Path, cluster: LoopbackCluster, submissions=SUBMISSIONS,
                **worker) -> Path:
    """The example event with a ``worker_type: dask`` section for ``cluster``."""
    section = {"worker_type": "dask", "dask_scheduler": cluster.address, "n_workers": 2,
               "conda_env": "ramp-iris", **worker}
    if cluster.certificates:
        c = cluster.certificates
        section["dask_security"] = {"tls_ca_file": str(c.ca_file),
                                    "tls_client_cert": str(c.client_cert),
                                    "tls_client_key": str(c.client_key),
                                    "require_encryption": True}
    return make_event(root, submissions=submissions, worker=section)


def _assert_same_outcome(rows, local_rows):
    assert {n: r.state for n, r in rows.items()} == {n: r.state for n, r in local_rows.items()}
    for name in ("starting_kit", "random_forest", "gradient_boosting"):
        assert rows[name].state == "scored"
        assert rows[name].scores == local_rows[name].scores
        assert rows[name].peak_memory_mb and rows[name].peak_memory_mb > 10
    assert rows["raising_error"].state == "training_error"
    assert "RuntimeError: raising_error" in rows["raising_error"].error_msg


def _cache_entries(cluster: LoopbackCluster) -> list[Path]:
    return sorted((cluster.folder / "workers").glob(f"**/{dask_task.CACHE_FOLDER}/*"))


# -- the "done when" --------------------------------------------------------------


def test_plain_cluster_without_shared_paths_scores_as_the_local_worker(
        plain_cluster, local_scores, tmp_path):
    path = _dask_event(tmp_path / "event", plain_cluster)
    rows = h.dispatch(path)
    _assert_same_outcome(rows, local_scores)
    config = load_event_config(path)
    predictions = Path(config.worker.predictions_dir) / "random_forest"
    assert (predictions / "bagged_scores.csv").is_file()
    assert (predictions / "fold_0" / "y_pred_test.npz").is_file()
    log = (Path(config.worker.logs_dir) / "raising_error" / "log").read_text()
    assert "RuntimeError: raising_error" in log
    # Kit and data went once to each Dask worker that ran something, named by content hash;
    # the data is the blinded folder (hidden test labels): the labels never left.
    kit_sha = archive.digest(archive.pack(config.worker.kit_dir))
    [blinded_data] = Path(f"{config.ledger_path}.blinded").glob("blinded-*")
    entries = _cache_entries(plain_cluster)
    shipped = {entry.name for entry in entries}
    assert {kit_sha, archive.digest(archive.pack(blinded_data))} <= shipped
    assert archive.digest(archive.pack(config.worker.data_dir)) not in shipped
    assert len(entries) in (2, 4)
    # Nothing under the dispatcher's paths was used by the workers: they ran elsewhere.
    assert str(tmp_path) not in (plain_cluster.folder / "workers.log").read_text()


def test_tls_cluster_scores_as_the_local_worker(tls_cluster, local_scores, tmp_path):
    # What TLS changes is the transport: one scored run and one failed run show it.
    two = ("starting_kit", "raising_error")
    rows = h.dispatch(_dask_event(tmp_path / "event", tls_cluster, submissions=two))
    assert rows["starting_kit"].state == "scored"
    assert rows["starting_kit"].scores == local_scores["starting_kit"].scores
    assert rows["raising_error"].state == "training_error"
    assert "RuntimeError: raising_error" in rows["raising_error"].error_msg


def test_tls_cluster_refuses_clients_without_its_certificates(tls_cluster, tmp_path):
    stranger = make_certificates(tmp_path / "other-ca")
    with pytest.raises((OSError, TimeoutError)):
        distributed.Client(tls_cluster.address, security=stranger.client_security(),
                           timeout="3s", set_as_default=False)
    plain = tls_cluster.address.replace("tls://", "tcp://")
    with pytest.raises((OSError, TimeoutError)):
        distributed.Client(plain, timeout="3s", set_as_default=False)


def _hanging_worker(cluster, tmp_path, **worker):
    path = make_event(tmp_path / "event", submissions=("hanging",), worker={
        "worker_type": "dask", "dask_scheduler": cluster.scheduler_address, **worker})
    config = load_event_config(path)
    prepare_data(config.worker.data_dir)
    with distributed.Client(cluster, set_as_default=False) as client:
        pids = h.worker_pids(client).values()
    return config, DaskWorker(config.worker_dict(), "hanging"), pids


def test_timeout_kills_the_process_tree_on_the_dask_worker(local_cluster, tmp_path):
    config, worker, pids = _hanging_worker(local_cluster, tmp_path, timeout=5)
    worker.setup()
    try:
        worker.launch_submission()
        watcher = h.drive(worker)
        # The supervisor, ramp-test and the child the submission forks.
        _, tree = h.wait_for_run(pids, minimum=3)
        watcher.join(60)
        assert worker.status == "timeout"
        returncode, error_msg = worker.collect_results()
    finally:
        worker.kill()
        worker.teardown()
    assert returncode == 124
    assert "timeout=5" in error_msg
    assert h.living(tree) == []
    log = (Path(config.worker.logs_dir) / "hanging" / "log").read_text()
    assert log.endswith("\nramp-runner: the run was stopped at its timeout (timeout=5 s)\n")


def test_kill_stops_the_remote_run_at_once(local_cluster, tmp_path):
    _, worker, pids = _hanging_worker(local_cluster, tmp_path)
    worker.setup()
    worker.launch_submission()
    watcher = h.drive(worker)
    _, tree = h.wait_for_run(pids, minimum=3)
    worker.kill()  # what the dispatcher does on SIGINT/SIGTERM, from its main thread
    watcher.join(10)
    assert worker.status == "killed"
    worker.teardown()
    assert h.living(tree, timeout=5) == []


def test_a_dead_dispatcher_leaves_no_run_behind(local_cluster, tmp_path):
    config, _, pids = _hanging_worker(local_cluster, tmp_path, timeout=600)
    dispatcher = subprocess.Popen(
        [sys.executable, "-c", DISPATCHER, str(config.path)], cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        _, tree = h.wait_for_run(pids, minimum=3)
    finally:
        dispatcher.kill()
        dispatcher.wait()
    # The scheduler drops the dead client's task; the task notices and kills its tree.
    assert h.living(tree, timeout=15) == []


def test_lost_dask_worker_gives_retry_and_the_next_try_scores(plain_cluster, tmp_path):
    path = _dask_event(tmp_path / "event", plain_cluster, submissions=())
    h.add_submission(path, "slow", h.SLOW_CLASSIFIER)
    with plain_cluster.client() as client:
        pids = h.worker_pids(client).values()
    result = {}
    dispatcher = threading.Thread(target=lambda: result.update(h.dispatch(path)))
    dispatcher.start()
    try:
        # The supervisor and ramp-test.
        victim, tree = h.wait_for_run(pids, minimum=2)
        os.kill(victim, signal.SIGKILL)
        # The supervisor ends the dead worker's ramp-test within a second or two.
        assert h.living(tree, timeout=10) == []
    finally:
        dispatcher.join(120)
    assert not dispatcher.is_alive()
    row = result["slow"]
    assert (row.state, row.attempts) == ("scored", 1), row
    with plain_cluster.client() as client:  # the nanny brings the worker back
        client.wait_for_workers(2, timeout=60)


# -- what else the issue asks -------------------------------------------------------------


def test_remote_run_environment_is_the_conda_env_with_n_threads_and_no_secrets(
        plain_cluster, tmp_path):
    path = _dask_event(tmp_path / "event", plain_cluster, submissions=())
    h.add_submission(path, "env_dump", ENV_DUMP_CLASSIFIER)
    config = load_event_config(path)
    prepare_data(config.worker.data_dir)
    worker = DaskWorker(config.worker_dict(), "env_dump")
    returncode, error_msg = worker.launch()
    assert returncode != 0 and "stop after printing the environment" in error_msg
    log = (Path(config.worker.logs_dir) / "env_dump" / "log").read_text()
    environment = environment_in_log(log)
    assert SECRET not in environment
    assert environment["OMP_NUM_THREADS"] == "1"  # the example's dispatcher.n_threads
    assert environment["PATH"].split(":")[0].endswith("envs/ramp-iris/bin")


def test_remote_kit_and_data_paths_are_used_without_shipping(local_cluster, tmp_path):
    on_the_worker = load_event_config(make_event(tmp_path / "remote"))
    prepare_data(on_the_worker.worker.data_dir)
    path = make_event(tmp_path / "event", submissions=("starting_kit",), worker={
        "worker_type": "dask", "dask_scheduler": local_cluster.scheduler_address,
        "kit_dir": str(tmp_path / "not-here" / "kit"),
        "data_dir": str(tmp_path / "not-here" / "data"),
        "remote_kit_dir": on_the_worker.worker.kit_dir,
        "remote_data_dir": on_the_worker.worker.data_dir})
    config = load_event_config(path)
    assert DaskWorker(config.worker_dict(), "starting_kit").launch() == (0, "")
    assert (Path(config.worker.predictions_dir) / "starting_kit" / "bagged_scores.csv").is_file()


def test_preflight_checks_only_the_kit_and_data_the_dask_workers_do_not_hold(local_cluster,
                                                                            tmp_path):
    missing = {"kit_dir": str(tmp_path / "not-here" / "kit"),
               "data_dir": str(tmp_path / "not-here" / "data")}
    section = {"worker_type": "dask", "dask_scheduler": local_cluster.scheduler_address,
               "hidden_test_labels": "off", **missing}

    def checked(name: str, **worker) -> list[str]:
        path = make_event(tmp_path / name, submissions=("starting_kit",),
                          worker={**section, **worker})
        return preflight(load_event_config(path))

    assert checked("held", remote_kit_dir="/on/the/workers/kit",
                   remote_data_dir="/on/the/workers/data") == []
    with pytest.raises(ConfigError, match=r"worker\.data_dir: .*no such folder"):
        checked("kit-held", remote_kit_dir="/on/the/workers/kit")
    with pytest.raises(ConfigError, match=r"worker\.kit_dir: .*no such folder"):
        checked("shipped")


def test_a_tar_with_parent_members_is_refused_on_the_dask_worker(local_cluster, tmp_path):
    kit = tmp_path / "kit"
    kit.mkdir()
    # Enough ../ to reach the root from any depth, then down to this test's folder.
    escape = "../" * 40 + str(tmp_path.relative_to("/") / "escaped.py")
    evil = archive.compress(h.tar_with({"classifier.py": b"", escape: b"x"}))
    job = {"run_id": "evil", "submission": "evil", "submission_tar": evil,
           "kit": {"path": str(kit)}, "data": {"path": str(kit)}, "conda_env": None,
           "n_threads": 1, "timeout": 10}
    with distributed.Client(local_cluster, set_as_default=False) as client:
        future = client.submit(dask_task.run_submission, job, pure=False)
        with pytest.raises(archive.UnsafeArchiveError, match="escapes"):
            future.result(timeout=60)
        leaked = client.run(h.cached_files, "**/escaped.py")
    assert not any(leaked.values())
    assert not (tmp_path / "escaped.py").exists()


@pytest.mark.parametrize("members, links", [
    ({"../escaped": b"x"}, None),
    ({"a/../../escaped": b"x"}, None),
    ({"/tmp/escaped": b"x"}, None),
    ({"ok": b"x"}, {"link": "/etc/passwd"}),
])
def test_unpack_refuses_escaping_members_before_writing_anything(tmp_path, members, links):
    with pytest.raises(archive.UnsafeArchiveError):
        archive.unpack(h.tar_with(members, links), tmp_path / "into")
    assert not (tmp_path / "into").exists()
    assert not (tmp_path / "escaped").exists()


def test_packing_depends_on_content_not_on_times(tmp_path):
    folder = tmp_path / "kit"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.py").write_text("a = 1\n")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "a.pyc").write_bytes(b"junk")
    first = archive.pack(folder)
    os.utime(folder / "sub" / "a.py", (1, 1))
    assert archive.pack(folder) == first
    (folder / "sub" / "a.py").write_text("a = 2\n")
    assert archive.digest(archive.pack(folder)) != archive.digest(first)
    archive.unpack(archive.compress(first), tmp_path / "copy")
    assert (tmp_path / "copy" / "sub" / "a.py").read_text() == "a = 1\n"
    assert not (tmp_path / "copy" / "__pycache__").exists()


def test_tls_settings_are_checked_when_the_worker_is_made(tmp_path):
    certificates = make_certificates(tmp_path / "tls")
    path = make_event(tmp_path / "event", submissions=("starting_kit",), worker={
        "worker_type": "dask", "dask_scheduler": "tcp://127.0.0.1:8786",
        "dask_security": {"tls_ca_file": str(certificates.ca_file),
                          "tls_client_cert": str(certificates.client_cert),
                          "tls_client_key": str(tmp_path / "missing.key")}})
    config = load_event_config(path)
    with pytest.raises(ConfigError, match="tls://"):
        DaskWorker(config.worker_dict(), "starting_kit")
    document = yaml.safe_load(path.read_text())
    document["worker"]["dask_scheduler"] = "tls://127.0.0.1:8786"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError, match="tls_client_key"):
        DaskWorker(load_event_config(path).worker_dict(), "starting_kit")


def test_a_limit_on_the_dask_worker_ends_the_run_as_training_error_naming_it(local_cluster,
                                                                              tmp_path):
    path = make_event(tmp_path / "event", submissions=(), worker={
        "worker_type": "dask", "dask_scheduler": local_cluster.scheduler_address,
        "log_limit_mb": 1, "timeout": 60})
    h.add_submission(path, "chatty", hostile.chatty(3))
    prepare_data(load_event_config(path).worker.data_dir)
    row = h.dispatch(path)["chatty"]
    assert row.state == "training_error", (row.state, row.error_msg)
    assert "log_limit_mb=1" in row.error_msg
    log = (Path(load_event_config(path).worker.logs_dir) / "chatty" / "log").read_text()
    assert "bytes of output cut here" in log


@pytest.mark.parametrize("kind", ["file link", "folder link", "dangling link", "fifo"])
def test_pack_refuses_links_and_special_files(tmp_path, kind):
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("outside the folder")
    folder = tmp_path / "submission"
    (folder / "deep").mkdir(parents=True)
    (folder / "classifier.py").write_text("x = 1\n")
    odd = folder / "deep" / "odd"
    if kind == "file link":
        odd.symlink_to(secret)
    elif kind == "folder link":
        odd.symlink_to(secret.parent)
    elif kind == "dangling link":
        odd.symlink_to(tmp_path / "nowhere")
    else:
        os.mkfifo(odd)
    with pytest.raises(archive.UnsafeArchiveError, match="^deep/odd is a symbolic link or a"):
        archive.pack(folder)


def test_a_submission_with_a_link_is_its_own_error_on_dask(local_cluster, tmp_path):
    path = make_event(tmp_path / "event", submissions=("starting_kit",), worker={
        "worker_type": "dask", "dask_scheduler": local_cluster.scheduler_address})
    (path.parent / "submissions" / "starting_kit" / "shadow").symlink_to("/etc/shadow")
    row = h.dispatch(path)["starting_kit"]
    assert (row.state, row.attempts) == ("training_error", 0), (row.state, row.error_msg)
    assert "shadow is a symbolic link" in row.error_msg
    assert str(tmp_path) not in row.error_msg  # the dispatcher's paths are not shown


# -- a Dask worker where the sandbox does not work --------------------------------------


@pytest.fixture
def unsandboxed_cluster(local_cluster, tmp_path):
    """The module's LocalCluster, its Dask workers' bubblewrap failing for one test."""
    with distributed.Client(local_cluster, set_as_default=False) as client:
        paths = client.run(h.break_sandbox, str(tmp_path / "broken-bwrap"))
        try:
            yield local_cluster
        finally:
            client.run(h.restore_sandbox, paths)


def test_sandbox_required_on_a_dask_worker_without_it_is_checking_error(unsandboxed_cluster,
                                                                          tmp_path):
    path = make_event(tmp_path / "event", submissions=("starting_kit",), worker={
        "worker_type": "dask", "dask_scheduler": unsandboxed_cluster.scheduler_address,
        "sandbox": "required"}, dispatcher={"max_attempts": 2})
    row = h.dispatch(path)["starting_kit"]
    assert (row.state, row.attempts) == ("checking_error", 0), (row.state, row.error_msg)
    assert "sandbox: required" in row.error_msg and "uid map" in row.error_msg
    assert "Dask worker tcp://127.0.0.1:" in row.error_msg
    assert "\n" not in row.error_msg
    # Nothing ran.
    config = load_event_config(path)
    assert not (Path(config.worker.predictions_dir) / "starting_kit").exists()


def test_sandbox_auto_on_a_dask_worker_without_it_warns_once_and_runs(unsandboxed_cluster,
                                                                      tmp_path, caplog):
    path = make_event(tmp_path / "event", submissions=("starting_kit",), worker={
        "worker_type": "dask", "dask_scheduler": unsandboxed_cluster.scheduler_address})
    # Three runs on two Dask workers: one of them runs two, and warns once only.
    names = ("starting_kit", "copy_1", "copy_2")
    for name in names[1:]:
        shutil.copytree(path.parent / "submissions" / "starting_kit",
                        path.parent / "submissions" / name)
    with caplog.at_level(logging.WARNING, logger="runner.sandbox"):
        rows = h.dispatch(path)
    assert {name: rows[name].state for name in names} == dict.fromkeys(names, "scored")
    warnings = [r.getMessage() for r in caplog.records if "NOT isolated" in r.getMessage()]
    places = [re.search(r"NOT isolated on Dask worker (tcp://[\d.]+:\d+): ", w) for w in warnings]
    assert all(places) and all("uid map" in w for w in warnings), warnings
    # Once per Dask worker that ran something.
    assert 1 <= len(warnings) <= 2 and len({p[1] for p in places}) == len(warnings), warnings


def test_a_sandbox_that_cannot_start_the_run_on_a_dask_worker_is_checking_error(
        local_cluster, tmp_path):
    with distributed.Client(local_cluster, set_as_default=False) as client:
        paths = client.run(h.break_sandbox, str(tmp_path / "bin"), True)
        try:
            path = make_event(tmp_path / "event", submissions=("starting_kit",), worker={
                "worker_type": "dask", "dask_scheduler": local_cluster.scheduler_address},
                dispatcher={"max_attempts": 2})
            row = h.dispatch(path)["starting_kit"]
        finally:
            client.run(h.restore_sandbox, paths)
    assert (row.state, row.attempts) == ("checking_error", 0), (row.state, row.error_msg)
    assert "could not start the run" in row.error_msg and "uid map" in row.error_msg
    assert "Dask worker tcp://127.0.0.1:" in row.error_msg
