"""Build throw-away events from the example iris event, for tests."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "iris"
GOOD_SUBMISSIONS = ("starting_kit", "random_forest", "gradient_boosting")


# A submission that prints the environment it runs in, then fails (ramp-test refuses
# source naming os-level process or file functions, hence the indirection).
ENV_DUMP_CLASSIFIER = '''
import importlib
import json


class Classifier:
    def fit(self, X, y):
        environ = getattr(importlib.import_module("o" + "s"), "environ")
        print("ENVIRONMENT=" + json.dumps(dict(environ)))
        raise RuntimeError("stop after printing the environment")

    def predict_proba(self, X):
        raise RuntimeError("never reached")
'''


def environment_in_log(log: str) -> dict[str, str]:
    """The environment an ``ENV_DUMP_CLASSIFIER`` run printed into its log."""
    line = next(x for x in log.splitlines() if x.startswith("ENVIRONMENT="))
    return json.loads(line.removeprefix("ENVIRONMENT="))


def make_event(root: Path, submissions=GOOD_SUBMISSIONS, worker=None, dispatcher=None) -> Path:
    """Copy the example kit, data script and ``submissions`` under ``root``; return config path.

    ``worker`` and ``dispatcher`` update the example config's sections; a remote event
    gives a whole worker section (``tests.sshd.ssh_worker_section`` or
    ``aws_worker_section``) and ``tests.sshd.remote_dispatcher()``.
    """
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(EXAMPLE / "ramp-kits", root / "ramp-kits",
                    ignore=shutil.ignore_patterns("training_output", "__pycache__"))
    data = root / "ramp-data" / "iris"
    data.mkdir(parents=True)
    shutil.copy(EXAMPLE / "ramp-data" / "iris" / "prepare_data.py", data)
    for name in submissions:
        shutil.copytree(EXAMPLE / "submissions" / name, root / "submissions" / name,
                        ignore=shutil.ignore_patterns("training_output", "__pycache__"))
    config = yaml.safe_load((EXAMPLE / "config.yml").read_text())
    config["worker"].update(worker or {})
    config["dispatcher"].update(dispatcher or {})
    path = root / "config.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def register_worker(site: Path, worker_type: str, target: str, source: str | None = None) -> None:
    """Declare ``target`` ("module:Class") as worker ``worker_type`` in the workers'
    entry-point group, in a dist-info folder under ``site`` (put ``site`` on sys.path);
    ``source`` is written as the module when given."""
    info = site / f"ramp_runner_{worker_type.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: ramp-runner-{worker_type}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[ramp_runner.workers]\n{worker_type} = {target}\n")
    if source is not None:
        (site / f"{target.partition(':')[0]}.py").write_text(source)


def install_fake_conda(folder: Path, envs: dict[str, Path]) -> Path:
    """Write a ``conda`` answering ``conda info --envs --json`` (conda cannot be installed here).

    The base environment is this test run's Python environment; ``envs`` maps other
    environment names to prefixes.
    """
    folder.mkdir(parents=True, exist_ok=True)
    info = {"root_prefix": sys.prefix, "envs": [sys.prefix, *map(str, envs.values())]}
    script = folder / "conda"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "if sys.argv[1:] != ['info', '--envs', '--json']:\n"
        "    sys.exit('fake conda: only `conda info --envs --json` is answered')\n"
        f"print({json.dumps(json.dumps(info))})\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def env_prefix_like_this_one(prefix: Path) -> Path:
    """Make ``prefix`` an environment with ramp-test and a python the sandbox can run: a
    link to this test run's environment, under another name.

    A folder of links to this venv's programs is not enough for the ingestion program:
    the sandbox binds the prefixes of the program it starts (``prefix``, and the base
    interpreter the links resolve to), so a link into this venv points nowhere inside it,
    and a python started from a prefix without this venv's ``pyvenv.cfg`` has none of its
    packages. A link to the whole venv is bound as the venv itself, and its python, started
    as ``prefix/bin/python``, finds ``prefix/pyvenv.cfg`` and its site-packages below
    ``prefix``. Nothing must be written under ``prefix``: it is this venv.
    """
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.symlink_to(sys.prefix, target_is_directory=True)
    return prefix


@contextmanager
def conda_knowing_ramp_iris(root: Path) -> Iterator[Path]:
    """A ``conda`` on PATH that knows ``ramp-iris`` (an env like this one), for a whole
    module (``monkeypatch`` is per test); yields the env's prefix."""
    prefix = env_prefix_like_this_one(root / "envs" / "ramp-iris")
    conda = install_fake_conda(root / "conda-bin", {"ramp-iris": prefix})
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("CONDA_EXE", raising=False)
        patch.setenv("PATH", f"{conda.parent}:{os.environ['PATH']}")
        yield prefix
