"""Dask workers as Slurm jobs (runner.dask.slurm) on a real one-node Slurm started here:
tasks run inside jobs, ``adapt`` scales back to zero, a job cancelled mid-task is a lost
worker, and a worker stops taking tasks before its walltime without cutting one short."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask
import distributed
import psutil
import pytest
import yaml

from runner.config import load_event_config
from runner.dask.cluster import ADDRESS_FILE
from runner.dask.slurm import WORKER_OVERHEAD_MB, SlurmDaskCluster, SlurmJobs
from tests.dask import helpers as h
from tests.events import install_fake_conda, make_event
from tests.gpu_stand_ins import GPU_VIEW_CLASSIFIER, gpu_views
from tests.slurm import PARTITION, slurm  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[2]
IDLE_SECONDS = 2.0
# Jobs start a Python Dask worker: seconds on a loaded machine.
JOB_START_SECONDS = 60.0


def job_of_this_worker(seconds: float = 0.0) -> str:
    """What a test task returns: the Slurm job it runs in (after ``seconds`` of work)."""
    time.sleep(seconds)
    return os.environ["SLURM_JOB_ID"]


def job_and_its_state(seconds: float) -> tuple[str, str]:
    """The Slurm job this task runs in and its state as ``squeue`` sees it from inside:
    asked while the task runs, as adapt may retire the job as soon as the task ends."""
    job_id = job_of_this_worker(seconds)
    state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                           text=True, check=True, timeout=30).stdout.strip()
    return job_id, state


def test_the_jobs_follow_the_event_and_outlast_a_run_started_at_the_end_of_the_lifetime(
        tmp_path):
    config = load_event_config(make_event(
        tmp_path / "event", submissions=(), dispatcher={"n_workers": 3, "n_threads": 2},
        worker={"worker_type": "dask", "dask_scheduler": "tcp://login:8786",
                "timeout": 7200, "memory_limit_mb": 4096}))
    jobs = SlurmJobs.from_event(config)
    assert (jobs.max_jobs, jobs.cpus_per_run, jobs.memory_limit_mb, jobs.gpus_per_run) == \
        (3, 2, 4096, 0)
    # Takes runs for 2 h ± 12 min, then finishes one of at most 2 h, then 5 min to leave.
    assert jobs.walltime() == "0-04:17:00"
    assert SlurmJobs.from_event(config, lifetime=86400).walltime() == "1-04:29:00"
    assert jobs.job_directives() == []
    assert SlurmJobs.from_event(config, gpus_per_run=2).job_directives() == ["--gres=gpu:2"]
    with_gpus = load_event_config(make_event(
        tmp_path / "gpu-event", submissions=(), dispatcher={"n_workers": 3},
        worker={"worker_type": "dask", "dask_scheduler": "tcp://login:8786",
                "gpus_per_run": 2}))
    assert SlurmJobs.from_event(with_gpus).job_directives() == ["--gres=gpu:2"]
    with pytest.raises(ValueError, match="lifetime"):
        SlurmJobs.from_event(config, lifetime=0)


def _jobs(**more) -> SlurmJobs:
    return SlurmJobs(**{"max_jobs": 2, "timeout": 60, "memory_limit_mb": 256, **more})


@pytest.fixture
def cluster(slurm, tmp_path):  # noqa: F811 - the fixture
    """A SLURMCluster on the test Slurm, scheduler on loopback, quick to scale down."""
    with SlurmDaskCluster(_jobs(), tmp_path / "cluster", host="127.0.0.1",
                          idle_seconds=IDLE_SECONDS) as started:
        yield started
    assert slurm.wait_for_no_jobs(10) == [], "closing the cluster left Slurm jobs"


def _wait_for_running_job(slurm, timeout: float = JOB_START_SECONDS) -> str:  # noqa: F811
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = slurm.command("squeue", "-h", "-t", "R", "-o", "%i").stdout.split()
        if running:
            return running[0]
        time.sleep(0.2)
    raise AssertionError(f"no Slurm job running after {timeout} s: {slurm.jobs()}")


def test_tasks_run_in_a_slurm_job_each_and_adapt_scales_back_to_zero(slurm, cluster):  # noqa: F811
    assert slurm.jobs() == []  # nothing runs before there is work
    with cluster.client() as client:
        futures = client.map(job_and_its_state, [2, 2], pure=False)
        jobs = [future.result(timeout=JOB_START_SECONDS) for future in futures]
        assert len({job_id for job_id, _ in jobs}) == 2, "one run per job"
        assert [state for _, state in jobs] == ["RUNNING", "RUNNING"]
        # The results are the workers' unique data while a client holds them: released,
        # the idle workers may go.
        for future in futures:
            future.release()
        assert slurm.wait_for_no_jobs(IDLE_SECONDS + 10) == []
        assert client.scheduler_info()["workers"] == {}


def test_a_job_cancelled_mid_task_fails_the_task_as_a_lost_worker(slurm, cluster):  # noqa: F811
    with cluster.client() as client:
        future = client.submit(job_of_this_worker, 60, pure=False)
        job_id = _wait_for_running_job(slurm)
        client.wait_for_workers(1, timeout=JOB_START_SECONDS)
        time.sleep(0.5)  # the task has started on the job's worker
        slurm.command("scancel", job_id)
        with pytest.raises(distributed.KilledWorker):
            future.result(timeout=30)
        # Not submitted again to a new job: the Dask worker reports a retry instead.
        assert slurm.wait_for_no_jobs(IDLE_SECONDS + 10) == []


def test_a_worker_past_its_lifetime_finishes_its_task_then_leaves(slurm, tmp_path):  # noqa: F811
    jobs = _jobs(lifetime=1.0)
    with SlurmDaskCluster(jobs, tmp_path / "cluster", host="127.0.0.1",
                          idle_seconds=60) as cluster, cluster.client() as client:
        # Longer than the lifetime: Dask's own --lifetime would cancel it halfway.
        first = client.submit(job_of_this_worker, 4, pure=False)
        first_job = first.result(timeout=JOB_START_SECONDS)
        # Released as the dispatcher does once it has the result: the drained worker
        # leaves with its job long before the idle timeout; the next task gets a new job.
        first.release()
        assert slurm.wait_for_no_jobs(10) == []
        # Forgotten, not kept to be submitted again whether or not a task waits.
        assert cluster.cluster.worker_spec == {}
        second = client.submit(job_of_this_worker, pure=False)
        assert second.result(timeout=JOB_START_SECONDS) != first_job
    assert slurm.wait_for_no_jobs(10) == []


def test_the_command_line_serves_the_event_through_slurm_with_tls(slurm, tmp_path):  # noqa: F811
    """``ramp-runner dask-cluster --slurm -e config.yml``: TLS because the event's scheduler
    address says tls://, the address in the folder, every job cancelled at Ctrl+C; the Dask
    section's ``gpus_per_run`` is each job's ``--gres=gpu:N``."""
    config = make_event(tmp_path / "event", submissions=(), dispatcher={"n_workers": 1},
                        worker={"worker_type": "dask", "gpus_per_run": 1,
                                "dask_scheduler": "tls://127.0.0.1:8786"})
    folder = tmp_path / "cluster"
    command = subprocess.Popen(
        [str(Path(sys.executable).parent / "ramp-runner"), "dask-cluster", "--slurm",
         "-e", str(config), "--folder", str(folder), "--port", "0",
         "--scheduler-host", "127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        # The scheduler there unpickles this module's task.
        env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        address_file = folder / ADDRESS_FILE
        deadline = time.monotonic() + JOB_START_SECONDS
        while not address_file.exists() and command.poll() is None:
            assert time.monotonic() < deadline, "no scheduler address written"
            time.sleep(0.2)
        address = address_file.read_text().strip()
        assert address.startswith("tls://127.0.0.1:")
        snippet = yaml.safe_load((folder / "worker-snippet.yml").read_text())["worker"]
        security = distributed.Security(**snippet["dask_security"])
        with distributed.Client(address, security=security, set_as_default=False) as client:
            future = client.submit(job_of_this_worker, pure=False)
            job_id = future.result(timeout=JOB_START_SECONDS)
            assert job_id in slurm.jobs()
            # The job holds the one stand-in GPU, and its Dask worker is shown it.
            assert "gres:gpu:1" in slurm.command("scontrol", "show", "job", job_id).stdout
            gpus = client.submit(environment_variable, "CUDA_VISIBLE_DEVICES", pure=False)
            assert gpus.result(timeout=JOB_START_SECONDS) == "0"
        with pytest.raises(OSError):  # plain connections are refused
            distributed.Client(address.replace("tls://", "tcp://"), timeout=2,
                               set_as_default=False)
    finally:
        os.killpg(command.pid, signal.SIGINT)
        out = command.communicate(timeout=60)[0]
    assert "stopping the cluster" in out, out
    assert slurm.wait_for_no_jobs(10) == []


def environment_variable(name: str) -> str | None:
    """What a test task returns: a variable of its Dask worker's environment (the GPUs
    Slurm gave the job, what the job script exported)."""
    return os.environ.get(name)


def test_each_job_asks_for_the_runs_memory_cpus_gpus_and_a_walltime_past_the_timeout(
        slurm, tmp_path):  # noqa: F811
    jobs = _jobs(max_jobs=1, cpus_per_run=2, gpus_per_run=1)
    # The site's settings, as an organiser writes them in Dask's jobqueue.yaml.
    site = {"jobqueue.slurm.queue": PARTITION,
            "jobqueue.slurm.job-script-prologue": ["export SITE_PROLOGUE=ran"],
            "jobqueue.slurm.job-extra-directives": ["--comment=site"]}
    with dask.config.set(site), \
            SlurmDaskCluster(jobs, tmp_path / "cluster", host="127.0.0.1") as cluster, \
            cluster.client() as client:
        gpus = client.submit(environment_variable, "CUDA_VISIBLE_DEVICES", pure=False)
        assert gpus.result(JOB_START_SECONDS) == "0"
        assert client.submit(environment_variable, "SITE_PROLOGUE").result() == "ran"
        job = slurm.command("scontrol", "show", "job", slurm.jobs()[0]).stdout
    assert f"Partition={PARTITION} " in job
    assert "Comment=site" in job
    assert "NumCPUs=2 " in job
    assert f"mem={256 + WORKER_OVERHEAD_MB}M" in job
    assert "gres:gpu:1" in job
    # Slurm counts whole minutes, rounded up.
    assert f"TimeLimit=00:{math.ceil(jobs.walltime_seconds / 60):02d}:00" in job
    assert jobs.walltime_seconds >= jobs.accepting_seconds + jobs.stagger_seconds + jobs.timeout


# -- the example event through the Dask worker, on Slurm --------------------------------------

EVENT_SUBMISSIONS = ("starting_kit", "random_forest", "raising_error")


def _slurm_event(root: Path, cluster: SlurmDaskCluster, **dispatcher) -> Path:
    # ramp-test's path, as the local event it is compared with (and whose ramp-test
    # processes the cancel test looks for in the Slurm jobs).
    return make_event(root, submissions=EVENT_SUBMISSIONS, dispatcher=dispatcher,
                      worker={"worker_type": "dask", "dask_scheduler": cluster.address,
                              "timeout": 120, "hidden_test_labels": "off"})


def test_the_example_event_scores_as_locally_then_slurm_scales_to_zero(
        slurm, cluster, tmp_path, monkeypatch):  # noqa: F811
    rows = h.dispatch(_slurm_event(tmp_path / "slurm", cluster, n_workers=2))
    conda = install_fake_conda(tmp_path / "conda-bin", {})
    monkeypatch.delenv("CONDA_EXE", raising=False)
    monkeypatch.setenv("PATH", f"{conda.parent}:{os.environ['PATH']}")
    local = h.dispatch(make_event(tmp_path / "local", submissions=EVENT_SUBMISSIONS,
                                  worker={"hidden_test_labels": "off"}))
    assert {n: r.state for n, r in rows.items()} == {n: r.state for n, r in local.items()}
    for name in ("starting_kit", "random_forest"):
        assert rows[name].scores == local[name].scores
    assert "RuntimeError: raising_error" in rows["raising_error"].error_msg
    assert slurm.wait_for_no_jobs(IDLE_SECONDS + 10) == []


def _job_running_ramp_test(slurm,  # noqa: F811
                           timeout: float = JOB_START_SECONDS) -> tuple[str, list[int]]:
    """The id of the job one of whose processes has a ramp-test below it, and the pids
    of that process's descendants (the run's tree)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                environ = process.environ()
                if environ.get("SLURM_CONF") != str(slurm.conf) or \
                        "SLURM_JOB_ID" not in environ:
                    continue
                tree = process.children(recursive=True)
                if any("ramp-test" in " ".join(child.cmdline()) for child in tree):
                    return environ["SLURM_JOB_ID"], [child.pid for child in tree]
        time.sleep(0.2)
    raise AssertionError(f"no ramp-test running in a Slurm job after {timeout} s")


def test_a_run_whose_job_is_cancelled_is_retried_and_scored(slurm, cluster, tmp_path):  # noqa: F811
    path = make_event(tmp_path / "event", submissions=(), dispatcher={"n_workers": 1},
                      worker={"worker_type": "dask", "dask_scheduler": cluster.address,
                              "timeout": 120, "hidden_test_labels": "off"})
    h.add_submission(path, "slow", h.SLOW_CLASSIFIER)
    rows = {}
    dispatcher = threading.Thread(target=lambda: rows.update(h.dispatch(path)), daemon=True)
    dispatcher.start()
    job_id, run_tree = _job_running_ramp_test(slurm)
    slurm.command("scancel", job_id)
    # Slurm's proctrack/linuxproc (and the run's own guard) leave nothing of the lost run.
    assert h.living(run_tree, timeout=10) == []
    dispatcher.join(JOB_START_SECONDS + 120)
    assert not dispatcher.is_alive(), "the dispatcher is still waiting"
    assert rows["slow"].state == "scored"
    assert rows["slow"].attempts == 1  # one retry: the run lost with its job
    assert slurm.wait_for_no_jobs(IDLE_SECONDS + 10) == []


def test_a_run_in_a_job_with_a_gpu_is_shown_that_gpu(slurm, tmp_path):  # noqa: F811
    """``gpus_per_run`` on Dask: the job asks Slurm for the GPU and the run is shown the one
    its job got. The stand-in GPU's device file is /dev/null (tests/slurm.py), not an
    NVIDIA node the sandbox could bind: the run goes without the sandbox here, and what it
    sees is CUDA_VISIBLE_DEVICES (the binding itself is tested in tests/test_gpus.py)."""
    with SlurmDaskCluster(_jobs(max_jobs=1, gpus_per_run=1), tmp_path / "cluster",
                          host="127.0.0.1", idle_seconds=IDLE_SECONDS) as cluster:
        path = make_event(tmp_path / "event", submissions=(), dispatcher={"n_workers": 1},
                          worker={"worker_type": "dask", "dask_scheduler": cluster.address,
                                  "timeout": 120, "hidden_test_labels": "off",
                                  "gpus_per_run": 1, "sandbox": "off"})
        h.add_submission(path, "gpu_view", GPU_VIEW_CLASSIFIER)
        rows = h.dispatch(path)
    assert rows["gpu_view"].state == "scored", rows["gpu_view"].error_msg
    log = (Path(load_event_config(path).worker.logs_dir) / "gpu_view" / "log").read_text()
    assert {view["cuda"] for view in gpu_views(log)} == {"0"}
    assert slurm.wait_for_no_jobs(IDLE_SECONDS + 10) == []


# -- nodes that refuse user namespaces ---------------------------------------------------------

NO_USER_NAMESPACES = Path(__file__).resolve().parents[1] / "no_user_namespaces.py"
# What bubblewrap says when the kernel refuses it a user namespace.
REFUSAL = "max_*_namespaces exceeded (ENOSPC)"


@pytest.fixture
def refusing_cluster(slurm, tmp_path):  # noqa: F811 - the fixture
    """Slurm jobs whose Dask worker runs as an ordinary user on a node that refuses user
    namespaces (``user.max_user_namespaces=0`` in the job's own namespace): bubblewrap meets
    the kernel's real refusal, as on a cluster whose admins turned them off."""
    # Its defaults loaded first: leaving ``dask.config.set`` would otherwise drop them.
    import dask_jobqueue  # noqa: F401

    python = f"{sys.executable} {NO_USER_NAMESPACES} {sys.executable}"
    with dask.config.set({"jobqueue.slurm.python": python}), \
            SlurmDaskCluster(_jobs(), tmp_path / "cluster", host="127.0.0.1",
                             idle_seconds=IDLE_SECONDS) as started:
        yield started
    assert slurm.wait_for_no_jobs(10) == [], "closing the cluster left Slurm jobs"


def _refusing_event(root: Path, cluster: SlurmDaskCluster, submissions, **worker) -> Path:
    return make_event(root, submissions=submissions, dispatcher={"n_workers": 2,
                                                                 "max_attempts": 2},
                      worker={"worker_type": "dask", "dask_scheduler": cluster.address,
                              "timeout": 120, "hidden_test_labels": "off", **worker})


def test_sandbox_required_on_nodes_refusing_user_namespaces_is_checking_error(
        refusing_cluster, tmp_path):
    path = _refusing_event(tmp_path / "event", refusing_cluster, ("starting_kit",),
                           sandbox="required")
    row = h.dispatch(path)["starting_kit"]
    assert (row.state, row.attempts) == ("checking_error", 0), (row.state, row.error_msg)
    assert "sandbox: required" in row.error_msg and REFUSAL in row.error_msg
    assert "Dask worker tcp://127.0.0.1:" in row.error_msg
    # Nothing ran.
    config = load_event_config(path)
    assert not (Path(config.worker.predictions_dir) / "starting_kit").exists()


def test_sandbox_auto_on_nodes_refusing_user_namespaces_warns_once_per_node_and_scores(
        refusing_cluster, tmp_path, caplog):
    names = ("starting_kit", "random_forest", "raising_error")
    path = _refusing_event(tmp_path / "event", refusing_cluster, names)
    with caplog.at_level(logging.WARNING, logger="runner.sandbox"):
        rows = h.dispatch(path)
    assert {name: rows[name].state for name in names} == {
        "starting_kit": "scored", "random_forest": "scored", "raising_error": "training_error"}
    warnings = [r.getMessage() for r in caplog.records if "NOT isolated" in r.getMessage()]
    places = [re.search(r"NOT isolated on Dask worker (tcp://[\d.]+:\d+): ", w) for w in warnings]
    assert warnings and all(places) and all(REFUSAL in w for w in warnings), warnings
    # Once per node's Dask worker (each Slurm job is one), however many runs it had.
    assert len({p[1] for p in places}) == len(warnings), warnings
