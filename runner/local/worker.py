"""CondaEnvWorker (``worker_type: conda``): ramp-test in a local conda environment."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from runner import blinded, gpus, ingest, ramptest, sandbox
from runner.errors import ConfigError, EventError
from runner.livelog import LiveCopy
from runner.local.conda import CondaError, conda_env_prefix, conda_executable
from runner.local.process import LocalRun
from runner.local.settings import CondaWorkerSection
from runner.results import run_end
from runner.worker import BaseWorker, RunArtifacts, RunState, WorkerStatus

logger = logging.getLogger("runner.worker")

MIB = 1024 * 1024


class CondaEnvWorker(BaseWorker):
    """Run a submission with ramp-test in a conda environment on this machine.

    The submission is copied to the worker's scratch folder so that a half-finished run
    never touches ``submissions_dir``; ``teardown`` removes the scratch. The run is
    confined (``runner.sandbox``): it sees the kit and data read-only, writes only its copy
    and a private /tmp, and is stopped at the worker's limits.
    """

    settings_class = CondaWorkerSection
    runs_ingestion = True

    def __init__(self, config: dict[str, Any], submission: str):
        super().__init__(config, submission)
        self._run: LocalRun | None = None
        self._bin: Path | None = None
        # Where ramp-engine's CondaEnvWorker keeps the environment's bin folder.
        self._python_bin_path: str | None = None
        self._confinement: sandbox.Confinement | None = None
        # The run's own GPUs (gpus_per_run of them), those of its dispatcher slot.
        self.gpus: tuple[int, ...] = ()
        self._live: LiveCopy | None = None

    @classmethod
    def preflight(cls, config: dict[str, Any]) -> list[str]:
        """The conda environment must exist and hold ramp-test; ``sandbox: required``
        without a working sandbox is refused, and ``auto`` without one warns loudly."""
        settings, source = cls.settings_of(config), cls.config_source(config)
        warnings = [*_check_conda(source, settings.conda_env),
                    *_check_sandbox(source, settings.sandbox)]
        # Said here, once per dispatcher, rather than at the first run's setup.
        sandbox.use_sandbox(settings.sandbox, cls.__name__)
        return warnings

    @classmethod
    def gpu_hosts(cls, config: dict[str, Any]) -> list[gpus.HostGPUs]:
        """This machine's GPUs (``gpus``, else nvidia-smi -L); ConfigError when neither
        gives them."""
        settings = cls.settings_of(config)
        try:
            found = gpus.host_gpus(settings.gpus)
        except gpus.GPUError as error:
            raise ConfigError(cls.config_source(config), "worker.gpus", "this machine's GPU "
                              "list (gpus: [0, 1]) when nvidia-smi -L cannot give it "
                              f"(worker.gpus_per_run={settings.gpus_per_run})",
                              str(error)) from None
        where = "worker.gpus" if settings.gpus is not None else "nvidia-smi -L"
        return [gpus.HostGPUs(where, found)]

    @classmethod
    def prepare(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Find the conda environment once per dispatcher (with a real conda, asking costs
        about a second), and this machine's GPUs when runs take some."""
        settings = cls.settings_of(config)
        prepared = {"conda_env": settings.conda_env,
                    "conda_prefix": str(_environment(settings.conda_env))}
        if settings.gpus_per_run:
            prepared["gpus"] = gpus.host_gpus(settings.gpus)
        return prepared

    @property
    def _submissions_copy(self) -> Path:
        return self.scratch / "submissions"

    def setup(self) -> None:
        """Check the config, find the environment's ramp-test and copy the submission to a
        scratch folder. A missing key or an unknown ``conda_env`` raises ValueError
        (EventError) naming it, and an unknown environment leaves ``status == 'error'``,
        as RAMP's worker does."""
        settings = self.read_config()
        conda_env = settings.conda_env
        prepared = settings.dispatch.prepared
        if prepared.get("conda_prefix") and prepared.get("conda_env") == conda_env:
            prefix = Path(prepared["conda_prefix"])
        else:
            prefix = None
        # A prefix found at the dispatcher's start is asked again only if it is gone.
        if prefix is None or not (prefix / "bin" / "ramp-test").exists():
            try:
                prefix = _environment(conda_env)
            except EventError:
                self.status = WorkerStatus.ERROR
                raise
        self._bin = prefix / "bin"
        self._python_bin_path = str(self._bin)
        copy = self._submissions_copy / self.submission
        # Links are copied as links: a link in a submission must not make the dispatcher
        # copy what it points to (/etc/shadow) where the run can read it.
        shutil.copytree(self.submission_folder(), copy, symlinks=True,
                        ignore=shutil.ignore_patterns("training_output"))
        hidden = self.hidden_labels
        # With hidden test labels the run sees the blinded data, not the data folder, and
        # none of the kit's own data.
        data = [settings.data_dir] if hidden is None else [hidden.folder, ingest.__file__]
        kit_data = Path(settings.kit_dir) / "data"
        if settings.gpus_per_run:
            # Without a dispatcher (no slot), a run takes the first GPUs.
            host = prepared.get("gpus")
            self.gpus = gpus.of_slot(host if host is not None else gpus.host_gpus(settings.gpus),
                                     settings.gpus_per_run, settings.dispatch.slot or 0)
        self._confinement = sandbox.confinement(
            settings, sandbox.use_sandbox(settings.sandbox, type(self).__name__),
            read_only=[settings.kit_dir, *data], writable=[copy], tmp=self.scratch / "tmp",
            hidden=[kit_data] if hidden is not None and kit_data.is_dir() else [],
            cpus=settings.dispatch.n_threads, gpus=self.gpus)
        self.sandboxed = self._confinement.sandbox
        super().setup()

    def start_run(self) -> None:
        """Start ramp-test, or the ingestion program with hidden test labels, in its own
        process group, its output going to the log: the event's live log of the
        submission when the dispatcher keeps one (``runner.livelog``)."""
        hidden = self.hidden_labels
        if hidden is None:
            argv = ramptest.command(
                self.submission,
                kit_dir=self.settings.kit_dir,
                data_dir=self.settings.data_dir,
                submissions_dir=str(self._submissions_copy),
                ramp_test=str(self._bin / "ramp-test"),
            )
        else:
            argv = blinded.ingest_command(str(self._bin / "python"), ingest.__file__,
                                          self.settings.kit_dir, hidden.folder,
                                          str(self._submissions_copy), self.submission)
        env = ramptest.child_environment(self.settings.dispatch.n_threads,
                                         extra_path=str(self._bin))
        if self.gpus:
            env.update(gpus.visible_devices(self.gpus))
        self._live = LiveCopy(self.settings.dispatch.live_log_dir, self.submission,
                              self.settings.log_limit_mb * MIB)
        log = self._live.start() or self.scratch / "log"
        self._run = LocalRun(argv, env, log, cwd=self.scratch, confinement=self._confinement,
                             aside=self.scratch)

    def poll_run(self) -> RunState:
        """Ended once the process exited."""
        return RunState.RUNNING if self._run.returncode is None else RunState.ENDED

    def wait(self, timeout: float) -> None:
        """Block on the process itself: its end is noticed at once, without polling."""
        if self._run is not None:
            self._run.wait(max(0.0, timeout))

    def stop_run(self) -> None:
        """Kill the run's whole process tree."""
        if self._run is not None:
            self._run.stop()

    def fetch_run(self, timed_out: bool) -> RunArtifacts:
        """Stop what is left of the run; its log and outputs are already here."""
        self._run.stop()
        return RunArtifacts(
            log=self._run.log_path,
            output=self._submissions_copy / self.submission / "training_output",
            end=run_end(self._run.stop_reason, self._run.returncode, timed_out),
            peak_memory_mb=self._run.peak_memory_mb)

    def release_run(self) -> None:
        """Make sure nothing of the run is left, and remove the supervisor's files and the
        live log."""
        if self._run is not None:
            self._run.stop()
            self._run.cleanup()
        if self._live is not None:
            self._live.remove()

def _check_conda(source: str, conda_env: str | None) -> list[str]:
    warnings = []
    if conda_executable() is None and conda_env is None:
        warnings.append(f"no conda found: submissions run in this Python environment "
                        f"({sys.prefix})")
    try:
        prefix = conda_env_prefix(conda_env)
    except CondaError as error:
        raise ConfigError(source, "worker.conda_env", "an existing conda environment",
                          str(error)) from None
    ramp_test = prefix / "bin" / "ramp-test"
    if not ramp_test.exists():
        raise ConfigError(source, "worker.conda_env", "an environment with ramp-workflow "
                          "installed", f"no {ramp_test}")
    return warnings


def _check_sandbox(source: str, mode: str) -> list[str]:
    """Local runs: the sandbox must work when required, and its absence is said loudly."""
    if mode == "off":
        return []
    works, why = sandbox.probe()
    if works:
        return []
    if mode == "required":
        raise ConfigError(source, "worker.sandbox", "a sandbox that works on this machine "
                          "(or sandbox: auto | off)", f"required, but {why}")
    return [f"SUBMISSIONS ARE NOT ISOLATED: the sandbox does not work on this machine ({why}); "
            "they run with the dispatcher's rights and can read and change the event's "
            "files (install bubblewrap, or set worker.sandbox: off to silence this)"]


def _environment(name: str | None) -> Path:
    """The prefix of conda environment ``name`` that has ramp-test (EventError if none)."""
    try:
        prefix = conda_env_prefix(name)
    except CondaError as error:
        raise CondaError(f"The specified conda environment {name} does not exist. "
                         f"({error})") from None
    if not (prefix / "bin" / "ramp-test").exists():
        raise CondaError(f"no ramp-test in {prefix / 'bin'}: install ramp-workflow in the "
                         f"environment {name or 'base'!r}")
    return prefix
