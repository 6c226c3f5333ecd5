"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

from tests.events import env_prefix_like_this_one, install_fake_conda


@pytest.fixture
def fake_conda(tmp_path, monkeypatch):
    """A ``conda`` on PATH with the base env (this venv) and an env called ``ramp-iris``."""
    prefix = env_prefix_like_this_one(tmp_path / "envs" / "ramp-iris")
    script = install_fake_conda(tmp_path / "conda-bin", {"ramp-iris": prefix})
    monkeypatch.delenv("CONDA_EXE", raising=False)
    monkeypatch.setenv("PATH", f"{script.parent}:{__import__('os').environ['PATH']}")
    return prefix
