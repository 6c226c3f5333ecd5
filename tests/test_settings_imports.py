"""Validating a config imports no backend: each worker type's settings live in a light module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted([*(REPO / "examples").glob("*/config*.yml"),
                  *(REPO / "tests" / "seed_configs").glob("*.yml")])
HEAVY = ("distributed", "fabric", "paramiko", "boto3", "botocore")
LOAD_AND_REPORT = """
import sys
from runner.config import load_event_config
config = load_event_config(sys.argv[1])
print(config.worker.worker_type)
print(" ".join(sorted(name for name in sys.argv[2:] if name in sys.modules)))
"""


def _imported_by_loading(path: Path) -> tuple[str, str]:
    """(worker_type, the heavy modules imported) of loading ``path`` in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", LOAD_AND_REPORT, str(path), *HEAVY],
                          capture_output=True, text=True, check=True, cwd=REPO)
    worker_type, imported = (done.stdout.splitlines() + [""])[:2]
    return worker_type, imported


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_loading_a_config_imports_no_backend_library(path):
    worker_type, imported = _imported_by_loading(path)
    assert worker_type
    assert imported == "", f"{path} ({worker_type}) imported {imported}"


def test_loading_an_ssh_config_imports_neither_fabric_nor_paramiko(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"worker": {"worker_type": "ssh", "hosts": [
        {"host": "127.0.0.1", "user": "ramp", "key_path": "key",
         "remote_ramp_kit_folder": "/srv/kit"}]}}))
    assert _imported_by_loading(path) == ("ssh", "")
