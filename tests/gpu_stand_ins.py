"""Stand-in GPUs for tests (no GPU exists on these machines): an ``nvidia-smi`` that lists
them, device nodes made with mknod as the NVIDIA driver makes them, and a submission that
prints what its run sees of them."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

NVIDIA_MAJOR = 195
# nvidiactl is minor 255 of the driver's major; nvidia-uvm has a major of its own.
CONTROL_MINOR = 255
UVM_MAJOR = 511

# What a run sees of the GPUs, printed into its log at each fold; it sleeps a little so
# that the two slots' runs overlap. Names ramp-test refuses in a submission's source
# (file listing) are reached through getattr.
GPU_VIEW_CLASSIFIER = '''
import importlib
import json
import time

from sklearn.linear_model import LogisticRegression


class Classifier:
    def __init__(self):
        self.model = LogisticRegression(max_iter=200)

    def fit(self, X, y):
        system = importlib.import_module("o" + "s")
        started = time.time()
        devices = {}
        for name in getattr(system, "list" + "dir")("/dev"):
            if name.startswith("nvidia"):
                rdev = getattr(system, "st" + "at")("/dev/" + name).st_rdev
                devices[name] = [system.major(rdev), system.minor(rdev)]
        time.sleep(1)
        print("GPU_VIEW=" + json.dumps({
            "cuda": getattr(system, "environ").get("CUDA_VISIBLE_DEVICES"),
            "order": getattr(system, "environ").get("CUDA_DEVICE_ORDER"),
            "devices": devices, "started": started, "ended": time.time()}))
        self.model.fit(X, y)
        return self

    def predict_proba(self, X):
        return self.model.predict_proba(X)
'''


def stand_in_nvidia_smi(folder: Path, indices: list[int]) -> Path:
    """A ``nvidia-smi`` answering ``-L`` as the real one does, listing ``indices``."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(f"GPU {i}: Stand-in GPU {i} (UUID: GPU-0000000{i}-stand-in)\n"
                    for i in indices)
    script = folder / "nvidia-smi"
    script.write_text(f"#!{sys.executable}\nimport sys\n"
                      "if sys.argv[1:] != ['-L']:\n"
                      "    sys.exit('stand-in nvidia-smi: only -L is answered')\n"
                      f"sys.stdout.write({lines!r})\n")
    script.chmod(0o755)
    return script


def make_device_nodes(folder: Path, indices: list[int]) -> None:
    """Character device nodes as the NVIDIA driver makes them (root: mknod)."""
    folder.mkdir(parents=True, exist_ok=True)
    nodes = {f"nvidia{i}": (NVIDIA_MAJOR, i) for i in indices}
    nodes.update({"nvidiactl": (NVIDIA_MAJOR, CONTROL_MINOR), "nvidia-uvm": (UVM_MAJOR, 0)})
    for name, (major, minor) in nodes.items():
        os.mknod(folder / name, 0o666 | stat.S_IFCHR, os.makedev(major, minor))


def gpu_views(log: str) -> list[dict]:
    """What a ``GPU_VIEW_CLASSIFIER`` run printed, fold by fold."""
    return [json.loads(line.removeprefix("GPU_VIEW=")) for line in log.splitlines()
            if line.startswith("GPU_VIEW=")]
