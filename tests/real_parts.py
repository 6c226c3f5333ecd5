"""The real parts the tests run against, as pytest fixtures: an OpenSSH sshd on 127.0.0.1,
moto's EC2 server, PostgreSQL, Dask clusters, and a stand-in conda.

A pytest plugin (after fabric's ``fabric/testing/fixtures.py``), registered once by
``pytest_plugins`` in tests/conftest.py: a test asks for a fixture by name and imports
nothing. The code that starts each part stays with its helpers (tests/sshd.py,
tests/postgres.py, tests/dask/helpers.py, tests/events.py, runner/dask/cluster.py); only
the fixtures are here. Slow parts start once per session (sshd, moto's server, the remote
kit) or once per module (PostgreSQL, Dask clusters, the module's conda). A fixture that
cannot start its part fails the test; nothing here skips.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import boto3
import distributed
import pytest

from runner.dask.cluster import LoopbackCluster
from tests.dask.helpers import cluster_env
from tests.events import (
    conda_knowing_ramp_iris,
    env_prefix_like_this_one,
    install_fake_conda,
)
from tests.postgres import PostgresServer
from tests.sshd import AMI_BASE, REGION, SSHServer, add_ami, free_port, host_kit, running_sshd

# -- conda (it cannot be installed here: a stand-in answering `conda info`) ----------------


@pytest.fixture
def fake_conda(tmp_path, monkeypatch):
    """A ``conda`` on PATH with the base env (this venv) and an env called ``ramp-iris``."""
    prefix = env_prefix_like_this_one(tmp_path / "envs" / "ramp-iris")
    script = install_fake_conda(tmp_path / "conda-bin", {"ramp-iris": prefix})
    monkeypatch.delenv("CONDA_EXE", raising=False)
    monkeypatch.setenv("PATH", f"{script.parent}:{os.environ['PATH']}")
    return prefix


@pytest.fixture(scope="module")
def fake_conda_module(tmp_path_factory):
    """A ``conda`` on PATH knowing ``ramp-iris`` (the env RAMP's event configs name), for a
    whole module; the env's prefix."""
    with conda_knowing_ramp_iris(tmp_path_factory.mktemp("conda")) as prefix:
        yield prefix


# -- an OpenSSH server, and moto's EC2 whose instances it plays ----------------------------


@pytest.fixture(scope="session")
def sshd(tmp_path_factory) -> SSHServer:
    """A real OpenSSH sshd on 127.0.0.1 with its own host key and one user key."""
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture(scope="session")
def remote_kit(tmp_path_factory) -> Path:
    """The kit as the AMI has it: a copy of the iris kit with the data inside."""
    return host_kit(tmp_path_factory.mktemp("remote"))


@pytest.fixture(scope="session")
def moto_server():
    """moto's EC2 API in this process (its backends are inspectable from the tests)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def aws(moto_server, monkeypatch):
    """A fresh moto account reached through the standard environment chain."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_server}/moto-api/reset",
                                                  method="POST"))
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    return boto3.client("ec2", region_name=REGION)


@pytest.fixture
def instance_at_sshd(aws, sshd, monkeypatch):
    """Every launched instance answers at the local sshd; the AMI of the event exists."""
    from runner.aws import ec2

    aws.create_security_group(GroupName="ramp-workers", Description="ramp workers")
    add_ami(AMI_BASE + "-2024-01-01", "2024-01-01T00:00:00+00:00",
            tags={"ramp-runner:ami-base-name": AMI_BASE})
    monkeypatch.setattr(ec2, "instance_address", lambda client, instance_id: (sshd.host,
                                                                              sshd.port))
    return aws


# -- PostgreSQL ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL 15 server on loopback; the test fails if it cannot start."""
    server = PostgresServer()
    yield server
    server.close()


# -- Dask clusters -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_cluster():
    """A LocalCluster of two single-thread worker processes."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def plain_cluster(tmp_path_factory):
    """``dask scheduler`` + two ``dask worker`` processes on 127.0.0.1, cwd elsewhere."""
    folder = tmp_path_factory.mktemp("plain-cluster")
    with LoopbackCluster(folder / "cluster", workers=2, cwd=folder,
                         env=cluster_env(folder)) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    """The same with TLS: certificates made here, encryption required."""
    folder = tmp_path_factory.mktemp("tls-cluster")
    with LoopbackCluster(folder / "cluster", workers=2, tls=True, cwd=folder,
                         env=cluster_env(folder)) as cluster:
        yield cluster
