"""One GPU per slot (worker key ``gpus_per_run``), through the real dispatcher and sandbox.

No GPU exists on these machines: the GPUs are stand-ins. A ``nvidia-smi`` script first on
PATH lists them, and their device nodes are made by the test with mknod (major 195, as the
NVIDIA driver's) in a folder of the test, which ``runner.gpus.DEVICE_DIR`` points at. The
machine's own /dev is left alone: a node made there would be seen by every process of the
machine (other tests running beside these) and would stay behind if the test were killed.
What is shown is what a run sees: CUDA_VISIBLE_DEVICES and the /dev/nvidia* nodes of its
sandbox (their major and minor numbers tell them apart); no CUDA call is made.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner import gpus, supervise
from runner.config import load_event_config
from runner.dispatcher import Dispatcher
from runner.errors import ConfigError
from runner.ledger import Ledger
from runner.preflight import preflight
from runner.ssh import worker as ssh_module
from tests.events import make_event
from tests.gpu_stand_ins import (
    CONTROL_MINOR,
    GPU_VIEW_CLASSIFIER,
    NVIDIA_MAJOR,
    UVM_MAJOR,
    gpu_views,
    make_device_nodes,
    stand_in_nvidia_smi,
)
from tests.hostile import add_submission
from tests.sshd import VENV_BIN, aws_worker_section, remote_dispatcher, ssh_worker_section
from tests.test_cli import ramp_runner


@pytest.fixture
def stand_in_gpus(tmp_path, monkeypatch):
    """Two GPUs listed by nvidia-smi (0 and 1); the device folder also holds nvidia2, a GPU
    of the machine that no run of the event may see."""
    smi = stand_in_nvidia_smi(tmp_path / "smi-bin", [0, 1])
    monkeypatch.setenv("PATH", f"{smi.parent}:{os.environ['PATH']}")
    devices = tmp_path / "dev"
    make_device_nodes(devices, [0, 1, 2])
    monkeypatch.setattr(gpus, "DEVICE_DIR", str(devices))
    assert not any(name.startswith("nvidia") for name in os.listdir("/dev"))
    return devices


def test_two_slots_each_see_only_their_own_gpu(tmp_path, stand_in_gpus):
    names = [f"gpu_view_{i}" for i in range(4)]
    path = make_event(tmp_path / "event", submissions=(),
                      worker={"gpus_per_run": 1, "sandbox": "required", "timeout": 60},
                      dispatcher={"n_workers": 2})
    for name in names:
        add_submission(path.parent / "submissions", name, GPU_VIEW_CLASSIFIER)
    config = load_event_config(path)
    assert not [w for w in preflight(config) if "GPU" in w or "ISOLATED" in w]
    Dispatcher(config).run()

    with Ledger(config.ledger_path) as ledger:
        assert {s.name: s.state for s in ledger.all()} == dict.fromkeys(names, "scored")
    runs = {}
    for name in names:
        views = gpu_views((Path(config.worker.logs_dir) / name / "log").read_text())
        assert views, name
        assert all(view["devices"] == views[0]["devices"] for view in views)
        assert all(view["cuda"] == views[0]["cuda"] for view in views)
        # CUDA numbers the GPUs as nvidia-smi does.
        assert {view["order"] for view in views} == {"PCI_BUS_ID"}
        runs[name] = (views[0]["cuda"], views[0]["devices"], views[0]["started"],
                      views[-1]["ended"])
    for cuda, devices, _, _ in runs.values():
        # Its one GPU, the one CUDA_VISIBLE_DEVICES names, and the driver's shared nodes;
        # nvidia-uvm-tools is absent on this "host", so not bound.
        assert cuda in ("0", "1")
        assert devices == {f"nvidia{cuda}": [NVIDIA_MAJOR, int(cuda)],
                           "nvidiactl": [NVIDIA_MAJOR, CONTROL_MINOR],
                           "nvidia-uvm": [UVM_MAJOR, 0]}
    # Both slots ran, and two runs at the same time never shared a GPU.
    assert {cuda for cuda, _, _, _ in runs.values()} == {"0", "1"}
    spans = list(runs.values())
    overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:]
                   if a[2] < b[3] and b[2] < a[3]]
    assert overlapping, runs
    assert all(a[0] != b[0] for a, b in overlapping)


def test_without_the_sandbox_a_run_still_gets_its_gpu_by_cuda_visible_devices(
        tmp_path, stand_in_gpus):
    path = make_event(tmp_path / "event", submissions=(),
                      worker={"gpus_per_run": 2, "gpus": [3, 1], "sandbox": "off"},
                      dispatcher={"n_workers": 1})
    add_submission(path.parent / "submissions", "gpu_view", GPU_VIEW_CLASSIFIER)
    config = load_event_config(path)
    Dispatcher(config).run()
    views = gpu_views((Path(config.worker.logs_dir) / "gpu_view" / "log").read_text())
    # The config's list is the machine's (nvidia-smi is not asked), in its order.
    assert {view["cuda"] for view in views} == {"3,1"}


def _event(tmp_path: Path, worker: dict, n_workers: int) -> Path:
    path = make_event(tmp_path / "event", submissions=(), worker=worker,
                      dispatcher={"n_workers": n_workers})
    (path.parent / "submissions").mkdir()
    return path


def test_check_config_refuses_more_slots_than_gpus_allow(tmp_path, stand_in_gpus):
    smi_path = os.environ["PATH"]
    path = _event(tmp_path, {"gpus_per_run": 1}, n_workers=3)
    refused = ramp_runner("check-config", "-e", str(path), env={"PATH": smi_path})
    assert refused.returncode == 2, refused.stdout + refused.stderr
    message = " ".join(refused.stderr.split())
    assert "dispatcher.n_workers: expected at most 2 slot(s) of worker.gpus_per_run=1 " \
        "GPU(s) from nvidia-smi -L: [0, 1], got 3" in message, message

    # Declared GPUs: four of them, two per run, hold two slots and not three.
    declared = _event(tmp_path / "declared", {"gpus_per_run": 2, "gpus": [0, 1, 2, 3]},
                      n_workers=3)
    with pytest.raises(ConfigError, match=r"dispatcher\.n_workers: expected at most 2 "
                       r"slot\(s\) of worker\.gpus_per_run=2 GPU\(s\) from worker\.gpus: "
                       r"\[0, 1, 2, 3\], got 3"):
        preflight(load_event_config(declared))

    fits = _event(tmp_path / "fits", {"gpus_per_run": 1}, n_workers=2)
    accepted = ramp_runner("check-config", "-e", str(fits), env={"PATH": smi_path})
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "gpus_per_run" in accepted.stdout


def test_a_machine_without_nvidia_smi_is_told_to_declare_its_gpus(tmp_path, monkeypatch):
    bare = tmp_path / "bare-bin"
    bare.mkdir()
    (bare / "python3").symlink_to(sys.executable)
    monkeypatch.setenv("PATH", str(bare))
    config = load_event_config(_event(tmp_path, {"gpus_per_run": 1}, n_workers=1))
    with pytest.raises(ConfigError, match=r"worker\.gpus: expected this machine's GPU list "
                       r"\(gpus: \[0, 1\]\) when nvidia-smi -L cannot give it"):
        preflight(config)


@pytest.mark.parametrize(("worker", "key", "expected"), [
    ({"gpus_per_run": -1}, "worker.gpus_per_run", "an integer >= 0"),
    ({"gpus_per_run": "one"}, "worker.gpus_per_run", "an integer"),
    ({"gpus_per_run": 1, "gpus": [0, 0]}, "worker.gpus", "distinct GPU indices >= 0"),
    ({"gpus_per_run": 1, "gpus": [-1]}, "worker.gpus", "distinct GPU indices >= 0"),
    ({"gpus_per_run": 3, "gpus": [0, 1]}, "worker.gpus", "at least gpus_per_run=3 GPU"),
    ({"gpus": "0,1"}, "worker.gpus", "a non-empty list of an integer"),
])
def test_gpu_keys_that_cannot_work_are_refused_naming_the_key(tmp_path, worker, key, expected):
    path = _event(tmp_path, worker, n_workers=1)
    with pytest.raises(ConfigError) as refused:
        load_event_config(path)
    assert refused.value.key_path.startswith(key)
    assert str(path) in str(refused.value) and expected in str(refused.value)


def test_nvidia_smi_listing_is_read_by_its_indices():
    listing = ("GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-3b0f)\n"
               "  MIG 1g.5gb Device 0: (UUID: MIG-aa)\n"
               "GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-9c1e)\n")
    assert gpus.parse_listing(listing) == (0, 1)
    assert gpus.of_slot((0, 1, 2, 3), 2, 1) == (2, 3)
    with pytest.raises(gpus.GPUError, match="slot 2 has no 2 GPU"):
        gpus.of_slot((0, 1, 2, 3), 2, 2)


# -- SSH hosts: places of their own on one host, its GPUs declared or listed there ------------


def _ssh_event(tmp_path: Path, sshd, remote_kit: Path, smi_bin: Path, n_workers: int,
               names: list[str], **host) -> Path:
    worker = ssh_worker_section(sshd, remote_kit, gpus_per_run=1, sandbox="required",
                                # The host's nvidia-smi is the stand-in.
                                remote_path_prefix=f"{smi_bin}:{VENV_BIN}")
    worker["hosts"][0].update(host)
    path = make_event(tmp_path / "event", submissions=(), worker=worker,
                      dispatcher=remote_dispatcher(n_workers=n_workers))
    (path.parent / "submissions").mkdir(exist_ok=True)
    for name in names:
        add_submission(path.parent / "submissions", name, GPU_VIEW_CLASSIFIER)
    return path


def test_an_ssh_host_runs_one_submission_per_gpu_each_seeing_only_its_own(
        tmp_path, stand_in_gpus, sshd, remote_kit):
    names = [f"gpu_view_{i}" for i in range(3)]
    smi_bin = tmp_path / "smi-bin"
    config = load_event_config(_ssh_event(tmp_path, sshd, remote_kit, smi_bin, 2, names))
    # The host declares no GPUs: its nvidia-smi -L is asked, over SSH.
    hosts = ssh_module.SSHWorker.gpu_hosts(config.worker_dict())
    assert [(h.where, h.gpus) for h in hosts] == [
        (f"nvidia-smi -L on {sshd.user}@{sshd.host}:{sshd.port}", (0, 1))]
    assert not [w for w in preflight(config) if "GPU" in w]
    Dispatcher(config).run()

    with Ledger(config.ledger_path) as ledger:
        assert {s.name: s.state for s in ledger.all()} == dict.fromkeys(names, "scored")
    spans = []
    for name in names:
        views = gpu_views((Path(config.worker.logs_dir) / name / "log").read_text())
        cuda = views[0]["cuda"]
        assert cuda in ("0", "1")
        assert all(view["devices"] == {f"nvidia{cuda}": [NVIDIA_MAJOR, int(cuda)],
                                       "nvidiactl": [NVIDIA_MAJOR, CONTROL_MINOR],
                                       "nvidia-uvm": [UVM_MAJOR, 0]} for view in views)
        spans.append((cuda, views[0]["started"], views[-1]["ended"]))
    # Two runs on the one host at once, on different GPUs.
    overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:]
                   if a[1] < b[2] and b[1] < a[2]]
    assert overlapping, spans
    assert all(a[0] != b[0] for a, b in overlapping)
    assert not ssh_module.host_in_use(config.worker.hosts[0])


def test_an_ssh_hosts_declared_gpus_bound_its_places(tmp_path, stand_in_gpus, sshd, remote_kit):
    smi_bin = tmp_path / "smi-bin"
    refused = load_event_config(_ssh_event(tmp_path / "two", sshd, remote_kit, smi_bin, 2, [],
                                           gpus=[1]))
    with pytest.raises(ConfigError, match=r"dispatcher\.n_workers: expected at most 1 slot\(s\) "
                       r"of worker\.gpus_per_run=1 GPU\(s\) from worker\.hosts\[0\]\.gpus: "
                       r"\[1\], got 2"):
        preflight(refused)
    config = load_event_config(_ssh_event(tmp_path / "one", sshd, remote_kit, smi_bin, 1,
                                          ["gpu_view"], gpus=[1]))
    Dispatcher(config).run()
    views = gpu_views((Path(config.worker.logs_dir) / "gpu_view" / "log").read_text())
    assert views and {view["cuda"] for view in views} == {"1"}
    assert set(views[0]["devices"]) == {"nvidia1", "nvidiactl", "nvidia-uvm"}


def test_an_aws_instance_gives_its_run_the_first_gpu_it_lists(
        tmp_path, stand_in_gpus, sshd, remote_kit, instance_at_sshd):
    smi_bin = tmp_path / "smi-bin"
    worker = aws_worker_section(sshd, remote_kit, gpus_per_run=1, sandbox="required",
                                remote_path_prefix=f"{smi_bin}:{VENV_BIN}")
    path = make_event(tmp_path / "event", submissions=(), worker=worker,
                      dispatcher=remote_dispatcher())
    (path.parent / "submissions").mkdir()
    add_submission(path.parent / "submissions", "gpu_view", GPU_VIEW_CLASSIFIER)
    config = load_event_config(path)
    Dispatcher(config).run()
    with Ledger(config.ledger_path) as ledger:
        assert ledger.get("gpu_view").state == "scored", ledger.get("gpu_view").error_msg
    views = gpu_views((Path(config.worker.logs_dir) / "gpu_view" / "log").read_text())
    assert views and {view["cuda"] for view in views} == {"0"}
    assert set(views[0]["devices"]) == {"nvidia0", "nvidiactl", "nvidia-uvm"}


def test_a_gpu_node_missing_on_the_host_is_the_events_fault_not_the_runs(tmp_path):
    """The supervisor alone: a run's GPU node must be there (``--device``), the driver's
    shared nodes may be missing (``--device-try``)."""
    make_device_nodes(tmp_path / "dev", [0])
    code = "import os; print(sorted(n for n in os.listdir('/dev') if n.startswith('nvidia')))"

    def supervised(*devices: str) -> tuple[int, str, dict | None]:
        reason = tmp_path / "reason"
        reason.unlink(missing_ok=True)
        completed = subprocess.run(
            [sys.executable, supervise.__file__, "--reason", str(reason), "--sandbox",
             "--tmp", str(tmp_path / "tmp"), *devices, "--", sys.executable, "-c", code],
            capture_output=True, text=True, timeout=60, check=False)
        return (completed.returncode, completed.stdout + completed.stderr,
                json.loads(reason.read_text()) if reason.exists() else None)

    returncode, out, reason = supervised(
        "--device", str(tmp_path / "dev" / "nvidia0"),
        "--device-try", str(tmp_path / "dev" / "nvidiactl"),
        "--device-try", str(tmp_path / "dev" / "nvidia-uvm-tools"))
    assert (returncode, reason) == (0, None), out
    assert "['nvidia0', 'nvidiactl']" in out
    returncode, out, reason = supervised("--device", str(tmp_path / "dev" / "nvidia1"))
    assert returncode != 0 and reason["fault"] == "event", out


def test_a_run_whose_gpu_node_is_gone_is_a_checking_error(tmp_path, stand_in_gpus):
    (stand_in_gpus / "nvidia1").unlink()  # the driver lost it: the machine's fault
    path = make_event(tmp_path / "event", submissions=(),
                      worker={"gpus_per_run": 1, "gpus": [1], "sandbox": "required"},
                      dispatcher={"n_workers": 1})
    add_submission(path.parent / "submissions", "gpu_view", GPU_VIEW_CLASSIFIER)
    config = load_event_config(path)
    Dispatcher(config).run()
    with Ledger(config.ledger_path) as ledger:
        row = ledger.get("gpu_view")
    assert row.state == "checking_error"
    assert f"GPU device node(s) {stand_in_gpus}/nvidia1 are missing" in row.error_msg
