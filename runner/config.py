"""Load and validate an event ``config.yml`` into typed, immutable objects.

The keys are those of RAMP's event configuration (sections ``ramp``, ``worker`` and
``dispatcher``); every error names the file, the key path and what was expected.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from runner import registry
from runner.conversion import FILLED, build, describe, did_you_mean, reject_unknown, require_mapping
from runner.errors import ConfigError
from runner.redaction import HIDDEN, is_secret
from runner.strict_yaml import load_yaml

DEFAULT_TIMEOUT = 7200
DEFAULT_MAX_ATTEMPTS = 3
LEDGER_FILENAME = "ramp-runner.sqlite3"
PATH_KEYS = ("kit_dir", "data_dir", "submissions_dir", "predictions_dir", "logs_dir")


@dataclasses.dataclass(frozen=True)
class DispatchFacts:
    """What the dispatcher adds to a worker's dict (``DISPATCHER_KEYS``), typed: built-in
    workers read it as ``settings.dispatch``; custom workers read the dict's keys, as in
    RAMP. Every key may be missing (a worker made without a dispatcher)."""

    n_threads: int | None = None
    time_between_collection: float | None = None
    event_name: str | None = None
    event_dir: str | None = None
    event_config: str | None = None
    # The dispatcher's scratch folder, reaped at its start (runs' private folders go there).
    scratch_dir: str | None = None
    # The event's folder of live logs (runner.livelog): running submissions' logs go there.
    live_log_dir: str | None = None
    dispatcher_id: str | None = None
    # What the worker type's ``prepare`` found once for every run, and the blinded data.
    prepared: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # The dispatcher's slot this run takes (0..slots-1): the GPUs it keeps (runner.gpus).
    slot: int | None = None

    @classmethod
    def of(cls, config: Mapping[str, Any], source: str) -> DispatchFacts:
        """The facts of a worker dict, their types checked (ConfigError names the key)."""
        prepared = config.get("prepared") or {}
        if not isinstance(prepared, Mapping):
            raise ConfigError(source, "worker.prepared", "a mapping", type(prepared).__name__)
        scalars = {k: config[k] for k in DISPATCHER_KEYS
                   if k != "prepared" and config.get(k) is not None}
        facts = build(cls, scalars, source, "worker")
        return dataclasses.replace(facts, prepared=dict(prepared))


# Keys the dispatcher adds to a worker's dict; accepted when such a dict is validated again.
DISPATCHER_KEYS = tuple(f.name for f in dataclasses.fields(DispatchFacts))


@dataclasses.dataclass(frozen=True)
class RampSection:
    """The ``ramp`` section: what the event is and where its files live."""

    problem_name: str
    event_name: str
    event_title: str | None = None
    event_is_public: bool = False
    sandbox_name: str = "starting_kit"
    deployment_dir: str | None = None
    kit_dir: str | None = None
    data_dir: str | None = None
    submissions_dir: str | None = None
    predictions_dir: str | None = None
    logs_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class WorkerSection:
    """Keys every worker type shares; the five paths are always filled in after loading."""

    worker_type: str = ""
    kit_dir: str | None = None
    data_dir: str | None = None
    submissions_dir: str | None = None
    predictions_dir: str | None = None
    logs_dir: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    # Isolation of the participant's code (runner.sandbox): auto uses bubblewrap where it
    # works and says loudly where it does not; required refuses to run without it.
    sandbox: Literal["auto", "required", "off"] = "auto"
    network: bool = False
    # Keep the test labels out of the participant's process (runner.blinded): auto does it
    # where the kit allows and says loudly where it does not; required refuses otherwise.
    hidden_test_labels: Literal["auto", "required", "off"] = "auto"
    # Limits of one run; passing one ends the run as the submission's training_error.
    memory_limit_mb: int = 8192
    output_limit_mb: int = 1024
    log_limit_mb: int = 20
    max_processes: int = 1024
    # What the dispatcher told this worker: never a key of the config file.
    dispatch: DispatchFacts = dataclasses.field(default_factory=DispatchFacts,
                                                metadata={FILLED: True})
    # GPUs each run gets for itself (runner.gpus); 0: runs see no GPU in the sandbox.
    gpus_per_run: int = 0

    # Keys that must be given a value (checked after the types).
    REQUIRED: typing.ClassVar[tuple[str, ...]] = ()

    def check(self, source: str, key_path: str) -> None:
        """Refuse values that have the right type but cannot work; subclasses extend it."""
        if self.timeout <= 0:
            raise ConfigError(source, f"{key_path}.timeout", "a positive number of seconds",
                              repr(self.timeout))
        for key in ("memory_limit_mb", "output_limit_mb", "log_limit_mb", "max_processes"):
            if getattr(self, key) < 1:
                raise ConfigError(source, f"{key_path}.{key}", "a positive integer",
                                  repr(getattr(self, key)))
        if self.gpus_per_run < 0:
            raise ConfigError(source, f"{key_path}.gpus_per_run", "an integer >= 0",
                              repr(self.gpus_per_run))

    def as_worker_dict(self, **dispatcher_keys: Any) -> WorkerConfig:
        """Return the dict a worker receives (the seed's ``config`` argument)."""
        # A list left empty stays unsaid, as in the file: validation refuses an empty one.
        values = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                  if not f.metadata.get(FILLED) and getattr(self, f.name) != ()}
        values.update(values.pop("extra", {}))
        values.update(dispatcher_keys)
        return WorkerConfig(values, section=self)


class WorkerConfig(dict):
    """A worker's plain config dict that remembers the section it was validated as,
    so that a worker built from it does not validate it again."""

    def __init__(self, values: Mapping[str, Any], section: WorkerSection):
        super().__init__(values)
        self.section = section
        self._as_made = dict(values)

    def unchanged_section(self) -> WorkerSection | None:
        """The section this dict was made from, or None once a key was set or removed
        (RAMP's callers may change a worker's dict until ``setup``)."""
        return self.section if dict(self) == self._as_made else None

    def for_run(self, **keys: Any) -> WorkerConfig:
        """A copy for one run with its dispatcher keys (``slot``), still known as made from
        its section when this dict was unchanged (so that the run does not validate it
        again)."""
        unknown = set(keys) - set(DISPATCHER_KEYS)
        if unknown:
            raise ValueError(f"not dispatcher keys: {sorted(unknown)}")
        run = WorkerConfig({**self, **keys}, section=self.section)
        if self.unchanged_section() is None:
            run._as_made = {}
        return run

    def public(self) -> dict[str, Any]:
        """The dict with every secret shown as ``<hidden>``: what may be printed."""
        names = _secret_names(type(self.section))
        return {k: HIDDEN if k in names and v is not None else v for k, v in self.items()}

    def __repr__(self) -> str:
        return f"WorkerConfig({self.public()!r})"

    __str__ = __repr__


def check_gpu_list(gpus: tuple[int, ...] | None, gpus_per_run: int, source: str,
                   key_path: str) -> None:
    """Refuse a host's declared ``gpus`` that cannot be a GPU list, or that holds fewer
    GPUs than one run takes."""
    if gpus is None:
        return
    if any(index < 0 for index in gpus) or len(set(gpus)) != len(gpus):
        raise ConfigError(source, key_path, "distinct GPU indices >= 0 (as nvidia-smi -L "
                          "numbers them)", repr(list(gpus)))
    if len(gpus) < gpus_per_run:
        raise ConfigError(source, key_path, f"at least gpus_per_run={gpus_per_run} GPU(s)",
                          repr(list(gpus)))


@dataclasses.dataclass(frozen=True)
class CustomWorkerSection(WorkerSection):
    """A worker type registered by a third party: its own keys pass through unchecked."""

    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DispatcherSection:
    """The ``dispatcher`` section: how many submissions run at once and how often to poll."""

    hunger_policy: Literal["sleep", "exit"] | None = None
    n_workers: int = 1
    n_threads: int | None = None
    # None: the worker type's own default (1 s; remote workers poll over SSH, less often).
    time_between_collection: float | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    ledger: str | None = None
    # At most this many of one team's submissions run at once (None: no cap).
    max_running_per_team: int | None = None

    @property
    def slots(self) -> int:
        """Submissions run at once: ``n_workers``, or cpu_count + 1 + n when negative."""
        if self.n_workers > 0:
            return self.n_workers
        return max(1, (os.cpu_count() or 1) + 1 + self.n_workers)


@dataclasses.dataclass(frozen=True)
class EventConfig:
    """A whole event configuration, paths resolved."""

    path: Path
    ramp: RampSection
    worker: WorkerSection
    dispatcher: DispatcherSection

    @property
    def ledger_path(self) -> Path:
        """Where the ledger lives: ``dispatcher.ledger``, else beside the config file, named
        after it, so that two configs in one folder never share a ledger by accident
        (``config.yml`` keeps the plain ``ramp-runner.sqlite3``)."""
        if self.dispatcher.ledger:
            return Path(self.dispatcher.ledger)
        if self.path.stem == "config":
            return self.path.parent / LEDGER_FILENAME
        return self.path.parent / f"ramp-runner-{self.path.stem}.sqlite3"

    def public_items(self) -> list[tuple[str, Any]]:
        """``(dotted key, value)`` of every key of the config, secrets shown as
        ``<hidden>``: what ``check-config`` may print."""
        items = [(f"ramp.{f.name}", getattr(self.ramp, f.name))
                 for f in dataclasses.fields(self.ramp)]
        items += [(f"worker.{k}", v) for k, v in self.worker_dict().public().items()]
        items += [(f"dispatcher.{f.name}", getattr(self.dispatcher, f.name))
                  for f in dataclasses.fields(self.dispatcher)]
        return items

    def secret_values(self) -> set[str]:
        """The values of the config's secrets (to redact them wherever text goes out)."""
        names = _secret_names(type(self.worker))
        return {str(getattr(self.worker, name)) for name in names
                if getattr(self.worker, name) not in (None, "")}

    def worker_dict(self, **more: Any) -> dict[str, Any]:
        """The dict handed to ``Worker(config, submission)``: the worker section plus
        what the dispatcher knows (``DISPATCHER_KEYS``)."""
        return self.worker.as_worker_dict(
            n_threads=self.dispatcher.n_threads,
            time_between_collection=self.dispatcher.time_between_collection,
            event_name=self.ramp.event_name,
            event_dir=str(self.path.parent),
            event_config=str(self.path),
            **more,
        )


def _secret_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if is_secret(f)}


def _plain(value: Any) -> Any:
    """Nested sections as plain dicts and lists, as a YAML file would give them."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return dict(value)
    return value


def load_event_config(path: str | os.PathLike[str]) -> EventConfig:
    """Read, validate and resolve an event ``config.yml``."""
    path = Path(path).expanduser().resolve()
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(source, "<file>", "a readable file", error.strerror) from None
    return parse_event_config(load_yaml(data, source), path)


def parse_event_config(document: Any, path: Path) -> EventConfig:
    """Validate an already-parsed document; ``path`` anchors relative paths and errors."""
    source = str(path)
    document = require_mapping(document, source, "<top level>")
    reject_unknown(document, ("ramp", "worker", "dispatcher"), source, "")
    if "worker" not in document:
        raise ConfigError(source, "worker", "a 'worker' section")

    ramp_values = require_mapping(document.get("ramp", _default_ramp(path)), source, "ramp")
    ramp = build(RampSection, ramp_values, source, "ramp")
    worker_values = dict(require_mapping(document["worker"], source, "worker"))
    dispatcher_values = dict(require_mapping(document.get("dispatcher") or {}, source,
                                             "dispatcher"))
    # The seed's Dask example sets n_workers in the worker section.
    if "n_workers" not in dispatcher_values and "n_workers" in worker_values:
        dispatcher_values["n_workers"] = worker_values["n_workers"]
    dispatcher = build(DispatcherSection, dispatcher_values, source, "dispatcher")
    _check_dispatcher(dispatcher, source)

    worker = worker_section(worker_values, source, "worker")
    worker = _resolve_paths(worker, ramp, path.parent)
    if dispatcher.ledger:
        dispatcher = dataclasses.replace(
            dispatcher, ledger=str(_absolute(dispatcher.ledger, path.parent))
        )
    return EventConfig(path=path, ramp=ramp, worker=worker, dispatcher=dispatcher)


def worker_section(values: Mapping[str, Any], source: str, key_path: str) -> WorkerSection:
    """Validate a worker section through the settings class of its ``worker_type``."""
    values = require_mapping(values, source, key_path)
    worker_type = values.get("worker_type")
    if worker_type is None:
        raise ConfigError(source, f"{key_path}.worker_type", "one of " + _types_text())
    if not isinstance(worker_type, str):
        raise ConfigError(source, f"{key_path}.worker_type", "a string", type(worker_type).__name__)
    known = registry.registered_worker_types()
    if worker_type not in known:
        raise ConfigError(source, f"{key_path}.worker_type",
                          "one of " + _types_text() + did_you_mean(worker_type, known),
                          repr(worker_type))
    try:
        section_class = registry.settings_class(worker_type)
    except (ImportError, AttributeError) as error:
        raise ConfigError(source, f"{key_path}.worker_type",
                          f"an importable worker ({known[worker_type]})", str(error)) from None
    return _validate(section_class, values, source, key_path)


def worker_settings(section_class: type[WorkerSection], config: Mapping[str, Any],
                    source: str) -> WorkerSection:
    """Validate the dict a worker received, whose five paths must be filled in.

    A dict made by ``EventConfig.worker_dict`` carries the section it was validated as,
    and is not validated again unless it was changed since.
    """
    for key in PATH_KEYS:
        if not config.get(key):
            raise ConfigError(source, f"worker.{key}", "a path")
    section = config.unchanged_section() if isinstance(config, WorkerConfig) else None
    if not isinstance(section, section_class):
        section = _validate(section_class, config, source, "worker")
    return dataclasses.replace(section, dispatch=DispatchFacts.of(config, source))


def _validate(section_class: type[WorkerSection], values: Mapping[str, Any], source: str,
              key_path: str) -> WorkerSection:
    if issubclass(section_class, CustomWorkerSection):
        # A third party's worker: the common keys are checked, its own pass through.
        common = {f.name for f in dataclasses.fields(WorkerSection) if not f.metadata.get(FILLED)}
        section = build(WorkerSection, {k: v for k, v in values.items() if k in common},
                         source, key_path)
        section.check(source, key_path)
        return section_class(
            **{f.name: getattr(section, f.name) for f in dataclasses.fields(section)},
            extra=types.MappingProxyType({k: v for k, v in values.items() if k not in common}),
        )
    values = {k: v for k, v in values.items() if k not in DISPATCHER_KEYS}
    # The seed's Dask example puts n_workers in the worker section; it is the dispatcher's.
    if "n_workers" not in {f.name for f in dataclasses.fields(section_class)}:
        values.pop("n_workers", None)
    section = build(section_class, values, source, key_path)
    for name in section_class.REQUIRED:
        if getattr(section, name) in ("", (), None):
            hint = typing.get_type_hints(section_class)[name]
            raise ConfigError(source, f"{key_path}.{name}", describe(hint))
    section.check(source, key_path)
    return section


def _default_ramp(path: Path) -> dict[str, Any]:
    # The seed's Dask example has only a worker section: name the event after its folder.
    name = path.parent.name or "event"
    return {"problem_name": name, "event_name": name}


def _check_dispatcher(dispatcher: DispatcherSection, source: str) -> None:
    if dispatcher.n_workers == 0:
        raise ConfigError(source, "dispatcher.n_workers", "a non-zero integer", "0")
    cpus = os.cpu_count() or 1
    if dispatcher.n_workers < -cpus:
        # Negative counts back from this machine's cpu_count: below it no slot is left.
        raise ConfigError(source, "dispatcher.n_workers",
                          f"a positive integer, or from -{cpus} to -1 (cpu_count + 1 + "
                          f"n_workers slots on this {cpus}-CPU machine)",
                          repr(dispatcher.n_workers))
    if dispatcher.n_threads is not None and dispatcher.n_threads < 1:
        raise ConfigError(source, "dispatcher.n_threads", "a positive integer",
                          repr(dispatcher.n_threads))
    if dispatcher.time_between_collection is not None and dispatcher.time_between_collection < 0:
        raise ConfigError(source, "dispatcher.time_between_collection",
                          "a number of seconds >= 0", repr(dispatcher.time_between_collection))
    if dispatcher.max_attempts < 1:
        raise ConfigError(source, "dispatcher.max_attempts", "an integer >= 1",
                          repr(dispatcher.max_attempts))
    if dispatcher.max_running_per_team is not None and dispatcher.max_running_per_team < 1:
        raise ConfigError(source, "dispatcher.max_running_per_team",
                          "an integer >= 1, or no key for no cap",
                          repr(dispatcher.max_running_per_team))


def _resolve_paths(worker: WorkerSection, ramp: RampSection, base: Path) -> WorkerSection:
    """Fill the five paths: worker section first, then ramp section, then RAMP's defaults."""
    root = _absolute(ramp.deployment_dir, base) if ramp.deployment_dir else base
    defaults = {
        "kit_dir": root / "ramp-kits" / ramp.problem_name,
        "data_dir": root / "ramp-data" / ramp.problem_name,
        "submissions_dir": root / "submissions",
        "predictions_dir": root / "predictions",
        "logs_dir": root / "logs",
    }
    resolved = {}
    for key in PATH_KEYS:
        value = getattr(worker, key) or getattr(ramp, key)
        resolved[key] = str(_absolute(value, base) if value else defaults[key])
    return dataclasses.replace(worker, **resolved)


def _absolute(value: str, base: Path) -> Path:
    candidate = Path(os.path.expandvars(value)).expanduser()
    return candidate if candidate.is_absolute() else (base / candidate).resolve()


def _types_text() -> str:
    return ", ".join(repr(name) for name in sorted(registry.registered_worker_types()))


