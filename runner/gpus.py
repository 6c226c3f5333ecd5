"""GPUs of a host and which of them a run gets: the worker keys ``gpus_per_run`` and ``gpus``.

A host's GPUs are those its config declares (``gpus: [0, 1, 2, 3]``), else those
``nvidia-smi -L`` lists. Slot ``s`` of a host always gets the same GPUs: the ``s``-th group of
``gpus_per_run`` in that list. A run sees its GPUs through ``CUDA_VISIBLE_DEVICES`` and, in
the sandbox, through its ``/dev/nvidia<N>`` nodes alone (with the driver's shared nodes).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from runner.errors import EventError

# Where the driver's device nodes are (the test suite points it at nodes it made).
DEVICE_DIR = "/dev"
# Nodes every CUDA process opens besides its GPUs'; bound when the host has them.
SHARED_DEVICES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools")
LIST_COMMAND = ("nvidia-smi", "-L")
# "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-...)": the index is the device node's minor.
LISTED_GPU = re.compile(r"^GPU (\d+):", re.MULTILINE)
LIST_TIMEOUT_SECONDS = 30


class GPUError(EventError):
    """The host's GPUs cannot be found, or are too few for the event's runs."""


@dataclass(frozen=True)
class HostGPUs:
    """One host's GPUs, and where the list was found (a config key, or nvidia-smi)."""

    where: str
    gpus: tuple[int, ...]


def parse_listing(text: str) -> tuple[int, ...]:
    """The GPU indices an ``nvidia-smi -L`` output lists, in its order."""
    return tuple(int(index) for index in LISTED_GPU.findall(text))


def host_gpus(declared: Sequence[int] | None) -> tuple[int, ...]:
    """This machine's GPUs: ``declared`` when the config gives them, else ``nvidia-smi -L``'s.

    GPUError when nvidia-smi is missing or fails: the event asked for GPUs this machine
    cannot show.
    """
    if declared is not None:
        return tuple(declared)
    try:
        completed = subprocess.run(LIST_COMMAND, capture_output=True, text=True, check=False,
                                   timeout=LIST_TIMEOUT_SECONDS, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise GPUError(f"cannot list this machine's GPUs with {' '.join(LIST_COMMAND)}: "
                       f"{error}") from None
    if completed.returncode != 0:
        raise GPUError(f"{' '.join(LIST_COMMAND)} exited {completed.returncode}: "
                       f"{(completed.stderr or completed.stdout).strip()[:300]}")
    return parse_listing(completed.stdout)


def runs_fit(gpus: Sequence[int], per_run: int) -> int:
    """How many runs of ``per_run`` GPUs each the list ``gpus`` holds at once."""
    return len(gpus) // per_run


def capacity(hosts: Sequence[HostGPUs], per_run: int) -> tuple[int, str]:
    """(how many runs of ``per_run`` GPUs ``hosts`` hold at once, that said in words)."""
    fit = sum(runs_fit(host.gpus, per_run) for host in hosts)
    lists = "; ".join(f"{host.where}: {list(host.gpus)}" for host in hosts)
    return fit, f"{fit} slot(s) of worker.gpus_per_run={per_run} GPU(s) from {lists}"


def of_slot(gpus: Sequence[int], per_run: int, slot: int) -> tuple[int, ...]:
    """The GPUs of slot ``slot`` (0-based): the same group for every run the slot takes."""
    group = tuple(gpus[slot * per_run:(slot + 1) * per_run])
    if len(group) < per_run:
        raise GPUError(f"slot {slot} has no {per_run} GPU(s) of its own among {list(gpus)} "
                       f"(gpus_per_run: {per_run})")
    return group


def allocated(environ: Mapping[str, str]) -> tuple[int, ...]:
    """The GPUs a batch system gave this process (a Dask worker in a Slurm job): Slurm's
    ``SLURM_JOB_GPUS`` (the node's indices), else ``CUDA_VISIBLE_DEVICES``; () when
    neither names GPU indices (UUIDs cannot be told apart as device nodes)."""
    for name in ("SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"):
        words = [word.strip() for word in environ.get(name, "").split(",") if word.strip()]
        if words and all(word.isdigit() for word in words):
            return tuple(int(word) for word in words)
    return ()


def visible_devices(gpus: Sequence[int]) -> dict[str, str]:
    """The variables that show a run its GPUs (and only them); CUDA numbers GPUs fastest
    first unless told to number them as nvidia-smi does, by PCI bus."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus)), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def device_nodes(gpus: Sequence[int], device_dir: str | None = None) -> tuple[list[str], list[str]]:
    """(the run's own GPU nodes, the driver's shared nodes) to bind into its sandbox; the
    shared ones are bound where the host has them (nvidia-uvm appears on first use)."""
    folder = (device_dir or DEVICE_DIR).rstrip("/")
    return ([f"{folder}/nvidia{index}" for index in gpus],
            [f"{folder}/{name}" for name in SHARED_DEVICES])
