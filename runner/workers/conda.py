"""CondaEnvWorker (``worker_type: conda``): ramp-test in a local conda environment."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from runner import ramptest
from runner.config import worker_settings
from runner.process import LocalRun
from runner.workers.base import BaseWorker

logger = logging.getLogger("runner.worker")


class CondaError(ValueError):
    """A conda environment that cannot be found or used."""


def conda_executable() -> str | None:
    """The conda to ask: ``$CONDA_EXE`` when set, else ``conda`` on PATH, else None."""
    return os.environ.get("CONDA_EXE") or shutil.which("conda")


def conda_env_prefix(name: str | None) -> Path:
    """Return the prefix of conda environment ``name`` (None: the base environment).

    With no conda installed and no name asked for, the Python environment running this
    code stands in for the base environment.
    """
    conda = conda_executable()
    if conda is None:
        if name is not None:
            raise CondaError(f"conda_env {name!r} asked for, but no conda was found "
                             "(set CONDA_EXE or put conda on PATH)")
        logger.info("no conda found: submissions run in this Python environment (%s)",
                    sys.prefix)
        return Path(sys.prefix)
    completed = subprocess.run([conda, "info", "--envs", "--json"], capture_output=True,
                               text=True, check=False)
    if completed.returncode != 0:
        raise CondaError(f"'{conda} info --envs --json' failed: {completed.stderr.strip()}")
    try:
        info = json.loads(completed.stdout)
        prefixes = [Path(p) for p in info["envs"]]
        root = Path(info.get("root_prefix") or info.get("conda_prefix") or prefixes[0])
    except (ValueError, KeyError, IndexError, TypeError):
        raise CondaError(f"'{conda} info --envs --json' gave no list of environments") from None
    if name is None or name == "base":
        return root
    for prefix in prefixes:
        if prefix.name == name and prefix != root:
            return prefix
    known = ", ".join(sorted({"base", *(p.name for p in prefixes if p != root)}))
    raise CondaError(f"unknown conda environment {name!r}; known: {known}")


class CondaEnvWorker(BaseWorker):
    """Run a submission with ramp-test in a conda environment on this machine.

    The submission is copied to a scratch folder so that a half-finished run never
    touches ``submissions_dir``; ``teardown`` removes the scratch.
    """

    def __init__(self, config: dict[str, Any], submission: str):
        super().__init__(config, submission)
        self.settings = worker_settings("conda", config, f"{type(self).__name__} config")
        self._scratch: Path | None = None
        self._run: LocalRun | None = None
        self._bin: Path | None = None

    @property
    def _log_path(self) -> Path:
        return Path(self.config["logs_dir"]) / self.submission / "log"

    @property
    def _output_dir(self) -> Path:
        return self._scratch / "submissions" / self.submission / "training_output"

    def setup(self) -> None:
        """Find the environment's ramp-test and copy the submission to a scratch folder."""
        prefix = conda_env_prefix(self.settings.conda_env)
        self._bin = prefix / "bin"
        if not (self._bin / "ramp-test").exists():
            raise CondaError(f"no ramp-test in {self._bin}: install ramp-workflow in the "
                             f"environment {self.settings.conda_env or 'base'!r}")
        source = Path(self.config["submissions_dir"]) / self.submission
        if not source.is_dir():
            raise ValueError(f"submission folder {source} does not exist")
        self._scratch = Path(tempfile.mkdtemp(prefix=f"ramp-{self.submission}-"))
        shutil.copytree(source, self._scratch / "submissions" / self.submission,
                        ignore=shutil.ignore_patterns("training_output"))
        super().setup()

    def launch_submission(self) -> None:
        """Start ramp-test in its own process group, its output going to the log."""
        if self._status != "setup":
            super().launch_submission()  # raises the contract's error
        argv = ramptest.command(
            self.submission,
            kit_dir=self.config["kit_dir"],
            data_dir=self.config["data_dir"],
            submissions_dir=str(self._scratch / "submissions"),
            ramp_test=str(self._bin / "ramp-test"),
        )
        env = ramptest.child_environment(self.config.get("n_threads"), extra_path=str(self._bin))
        self._run = LocalRun(argv, env, self._log_path, cwd=self._scratch)
        super().launch_submission()

    def _is_submission_finished(self) -> bool:
        return self._run.returncode is not None

    def wait(self, timeout: float) -> None:
        """Block on the process itself: its end is noticed at once, without polling."""
        if self._run is not None:
            self._run.wait(max(0.0, timeout))

    def collect_results(self) -> tuple[int, str]:
        """Stop what is left of the run, keep its log and, on success, its predictions."""
        super().collect_results()
        timed_out = self._status == "timeout"
        self._run.stop()
        self.peak_memory_mb = self._run.peak_memory_mb
        if timed_out:
            returncode, error_msg = ramptest.TIMEOUT_RETURNCODE, ramptest.timeout_message(
                self.timeout)
            with open(self._log_path, "a") as log:
                log.write(f"\n{error_msg}\n")
        else:
            returncode = self._run.returncode
            log = self._log_path.read_text(errors="replace")
            error_msg = "" if returncode == 0 else (
                ramptest.traceback_of(log) or _tail(log) or f"ramp-test exited with {returncode}"
            )
        if returncode == 0:
            target = Path(self.config["predictions_dir"]) / self.submission
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(self._output_dir, target)
        self.status = "collected"
        logger.info("%r collected: returncode %s", self, returncode)
        return returncode, error_msg

    def kill(self) -> None:
        """Kill the run's whole process tree."""
        super().kill()
        if self._run is not None:
            self._run.stop()

    def teardown(self) -> None:
        """Make sure nothing of the run is left, and remove the scratch folder."""
        self._check_teardown_allowed()
        if self._run is not None:
            self._run.stop()
            self._run.cleanup()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
        super().teardown()


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def environment_command(action: str, conda_env: str | None, kit_dir: str | Path) -> list[str]:
    """The argv of ``conda env create|update -n ENV -f KIT/environment.yml``.

    This is RAMP's ``ramp setup create-conda-env`` / ``update-conda-env``.
    """
    if action not in ("create", "update"):
        raise ValueError(f"action {action!r}: expected 'create' or 'update'")
    if not conda_env:
        raise ValueError("worker.conda_env: expected the name of the environment to "
                         f"{action}")
    conda = conda_executable()
    if conda is None:
        raise CondaError("no conda found (set CONDA_EXE or put conda on PATH)")
    spec = Path(kit_dir) / "environment.yml"
    if not spec.exists():
        raise ValueError(f"{spec}: expected the kit's environment.yml")
    return [conda, "env", action, "--name", conda_env, "--file", str(spec)]
