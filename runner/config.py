"""Load and validate an event ``config.yml`` into typed, immutable objects.

The keys are those of RAMP's event configuration (sections ``ramp``, ``worker`` and
``dispatcher``); every error names the file, the key path and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from runner import registry
from runner.errors import EventError

DEFAULT_TIMEOUT = 7200
DEFAULT_MAX_ATTEMPTS = 3
LEDGER_FILENAME = "ramp-runner.sqlite3"
# Keys the dispatcher adds to a worker's dict; accepted when such a dict is validated again.
DISPATCHER_KEYS = ("n_threads", "time_between_collection", "event_name", "event_dir",
                   "event_config", "scratch_dir", "dispatcher_id", "prepared")
PATH_KEYS = ("kit_dir", "data_dir", "submissions_dir", "predictions_dir", "logs_dir")
# A config is a few dozen values: these bounds refuse alias bombs and runaway nesting long
# before they cost time or memory, and keep every walk of the document far from Python's
# recursion limit.
MAX_DEPTH = 32
MAX_VALUES = 10_000
HIDDEN = "<hidden>"
# Credentials that can reach a log without being in the config: botocore's debug output
# names the access key id it signs with and sends the session token as a header, whether
# they came from the config, the environment or ~/.aws/credentials.
CREDENTIAL_PATTERNS = (
    re.compile(r"(Credential=)[^/\s,'\"]+"),
    re.compile(r"(X-Amz-Security-Token['\"]?\s*[:=]\s*b?['\"]?)[^'\"\s,}]+", re.IGNORECASE),
)


class ConfigError(EventError):
    """An event configuration that cannot be used, with where and why."""

    def __init__(self, source: str, key_path: str, expected: str, got: str | None = None):
        self.source, self.key_path, self.expected = source, key_path, expected
        message = f"{source}: {key_path}: expected {expected}"
        if got is not None:
            message += f", got {got}"
        super().__init__(message)


def secret(**kwargs: Any) -> Any:
    """A dataclass field holding a credential: kept out of reprs and error messages."""
    return dataclasses.field(repr=False, metadata={"secret": True}, **kwargs)


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
    # Limits of one run; passing one ends the run as the submission's training_error.
    memory_limit_mb: int = 8192
    output_limit_mb: int = 1024
    log_limit_mb: int = 20
    max_processes: int = 1024

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

    def as_worker_dict(self, **dispatcher_keys: Any) -> WorkerConfig:
        """Return the dict a worker receives (the seed's ``config`` argument)."""
        values = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
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

    def public(self) -> dict[str, Any]:
        """The dict with every secret shown as ``<hidden>``: what may be printed."""
        names = _secret_names(type(self.section))
        return {k: HIDDEN if k in names and v is not None else v for k, v in self.items()}

    def __repr__(self) -> str:
        return f"WorkerConfig({self.public()!r})"

    __str__ = __repr__


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
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("secret")}


class RedactSecrets(logging.Filter):
    """A logging filter that replaces the given secret values by ``<hidden>`` in every
    record's message and traceback (botocore's debug output carries the access key id).

    Install it on each handler (``install_redaction``): filters on a logger do not see the
    records its children propagate.
    """

    def __init__(self, secrets: typing.Iterable[str]):
        super().__init__()
        # Longest first, so that a secret containing another is hidden whole.
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        """``text`` with every secret and every signed credential replaced by ``<hidden>``."""
        for value in self.secrets:
            text = text.replace(value, HIDDEN)
        for pattern in CREDENTIAL_PATTERNS:
            text = pattern.sub(rf"\g<1>{HIDDEN}", text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.redact(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        # The traceback is now text; handlers must not format the raw exception again.
        record.exc_info = None
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def install_redaction(config: EventConfig, logger: logging.Logger | None = None) -> None:
    """Hide the config's secrets in everything the handlers of ``logger`` (the root logger
    by default) write, whatever the level. Call it after the handlers are set up."""
    redactor = RedactSecrets(config.secret_values())
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(redactor)


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


def load_yaml(data: bytes, source: str) -> Any:
    """Parse a YAML document strictly: UTF-8, no key given twice, at most ``MAX_DEPTH``
    levels and ``MAX_VALUES`` values once aliases are expanded (ConfigError otherwise)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(source, "<file>", "UTF-8 text",
                          f"byte 0x{data[error.start]:02x} at offset {error.start}") from None
    try:
        _check_depth(text, source)
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _NodeCheck(source).walk(node, "", 0)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        raise ConfigError(source, "<file>", "a YAML mapping", _yaml_problem(error)) from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or getattr(error, "reason", None)
    got = f"invalid YAML ({problem})" if problem else "invalid YAML"
    if mark is not None:
        got += f" at line {mark.line + 1}"
    elif hasattr(error, "position"):
        got += f" at character {error.position}"
    return got


def _check_depth(text: str, source: str) -> None:
    """Refuse nesting deeper than ``MAX_DEPTH`` from the parser's events, before PyYAML's
    composer (which recurses once per level: 5,000 brackets exhaust the stack) and its
    scanner (slow on deep flow nesting) see the document; libyaml's parser when present."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    depth = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError(source, "<file>", f"at most {MAX_DEPTH} levels of nesting",
                                  f"deeper at line {event.start_mark.line + 1}")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


class _NodeCheck:
    """One walk of the composed document, before anything is built from it: duplicate
    keys, and the size and depth the document has once its aliases are expanded."""

    def __init__(self, source: str):
        self.source = source
        self.sizes: dict[int, int] = {}
        self.open: set[int] = set()

    def walk(self, node: yaml.Node, key_path: str, depth: int) -> int:
        """Return how many values ``node`` stands for, aliases expanded."""
        where = key_path or "<top level>"
        if depth > MAX_DEPTH:
            raise ConfigError(self.source, where, f"at most {MAX_DEPTH} levels of nesting "
                              "(aliases expanded)", f"deeper at line {node.start_mark.line + 1}")
        if id(node) in self.open:
            raise ConfigError(self.source, where, "no alias inside its own anchor",
                              f"one at line {node.start_mark.line + 1}")
        if id(node) in self.sizes:
            return self.sizes[id(node)]
        self.open.add(id(node))
        size = 1
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                size += self.walk(item, f"{key_path}[{i}]", depth + 1)
                self._bound(size, where, item)
        elif isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                name = str(key.value) if isinstance(key, yaml.ScalarNode) else "<key>"
                child = f"{key_path}.{name}" if key_path else name
                if name in seen and name != "<<":
                    raise ConfigError(self.source, child, "each key once",
                                      f"it again at line {key.start_mark.line + 1} "
                                      f"(first at line {seen[name]})")
                seen[name] = key.start_mark.line + 1
                size += self.walk(key, child, depth + 1) + self.walk(value, child, depth + 1)
                self._bound(size, where, value)
        self.open.discard(id(node))
        self.sizes[id(node)] = size
        return size

    def _bound(self, size: int, where: str, node: yaml.Node) -> None:
        if size > MAX_VALUES:
            raise ConfigError(self.source, where,
                              f"at most {MAX_VALUES} values once aliases are expanded",
                              f"more by line {node.start_mark.line + 1}")


def parse_event_config(document: Any, path: Path) -> EventConfig:
    """Validate an already-parsed document; ``path`` anchors relative paths and errors."""
    source = str(path)
    document = _mapping(document, source, "<top level>")
    _reject_unknown(document, ("ramp", "worker", "dispatcher"), source, "")
    if "worker" not in document:
        raise ConfigError(source, "worker", "a 'worker' section")

    ramp_values = _mapping(document.get("ramp", _default_ramp(path)), source, "ramp")
    ramp = _build(RampSection, ramp_values, source, "ramp")
    worker_values = dict(_mapping(document["worker"], source, "worker"))
    dispatcher_values = dict(_mapping(document.get("dispatcher") or {}, source, "dispatcher"))
    # The seed's Dask example sets n_workers in the worker section.
    if "n_workers" not in dispatcher_values and "n_workers" in worker_values:
        dispatcher_values["n_workers"] = worker_values["n_workers"]
    dispatcher = _build(DispatcherSection, dispatcher_values, source, "dispatcher")
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
    values = _mapping(values, source, key_path)
    worker_type = values.get("worker_type")
    if worker_type is None:
        raise ConfigError(source, f"{key_path}.worker_type", "one of " + _types_text())
    if not isinstance(worker_type, str):
        raise ConfigError(source, f"{key_path}.worker_type", "a string", type(worker_type).__name__)
    known = registry.registered_worker_types()
    if worker_type not in known:
        raise ConfigError(source, f"{key_path}.worker_type",
                          "one of " + _types_text() + _suggestion(worker_type, known),
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
    if isinstance(section, section_class):
        return section
    return _validate(section_class, config, source, "worker")


def _validate(section_class: type[WorkerSection], values: Mapping[str, Any], source: str,
              key_path: str) -> WorkerSection:
    if issubclass(section_class, CustomWorkerSection):
        # A third party's worker: the common keys are checked, its own pass through.
        common = {f.name for f in dataclasses.fields(WorkerSection)}
        section = _build(WorkerSection, {k: v for k, v in values.items() if k in common},
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
    section = _build(section_class, values, source, key_path)
    for name in section_class.REQUIRED:
        if getattr(section, name) in ("", (), None):
            hint = typing.get_type_hints(section_class)[name]
            raise ConfigError(source, f"{key_path}.{name}", _describe(hint))
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


def _mapping(value: Any, source: str, key_path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(source, key_path, "a mapping of keys to values", type(value).__name__)
    return value


def _reject_unknown(values: Mapping[str, Any], known: typing.Iterable[str], source: str,
                    prefix: str) -> None:
    known = list(known)
    for key in values:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(
                source, where, "a known key" + _suggestion(str(key), known),
                "an unknown key",
            )


def _suggestion(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _types_text() -> str:
    return ", ".join(repr(name) for name in sorted(registry.registered_worker_types()))


def _build(cls: type, values: Mapping[str, Any], source: str, key_path: str) -> Any:
    """Build dataclass ``cls`` from ``values``, checking names, presence and types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
    _reject_unknown(values, fields, source, key_path)
    arguments = {}
    for name, field in fields.items():
        where = f"{key_path}.{name}"
        if name not in values:
            required = (field.default is dataclasses.MISSING
                        and field.default_factory is dataclasses.MISSING)
            if required:
                raise ConfigError(source, where, _describe(hints[name]))
            continue
        arguments[name] = _convert(values[name], hints[name], source, where,
                                   field.metadata.get("secret", False))
    return cls(**arguments)


def _convert(value: Any, hint: Any, source: str, where: str, is_secret: bool) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    shown = "<hidden>" if is_secret else repr(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        # YAML writes None as null, but the seed writes ``hunger_policy: None``.
        if value == "None" and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        choices = typing.get_args(inner[0])
        if typing.get_origin(inner[0]) is Literal and value not in choices:
            expected = _describe(hint) + _suggestion(str(value), map(str, choices))
            raise ConfigError(source, where, expected, shown)
        return _convert(value, inner[0], source, where, is_secret)
    if origin is Literal:
        if value not in args:
            expected = _describe(hint) + _suggestion(str(value), map(str, args))
            raise ConfigError(source, where, expected, shown)
        return value
    if origin is tuple:
        if not isinstance(value, list) or not value:
            raise ConfigError(source, where, _describe(hint), type(value).__name__)
        return tuple(
            _convert(item, args[0], source, f"{where}[{i}]", is_secret)
            for i, item in enumerate(value)
        )
    if dataclasses.is_dataclass(hint):
        return _build(hint, _mapping(value, source, where), source, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, where, "true or false", shown)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, where, "an integer", shown)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(source, where, "a number", shown)
        if not math.isfinite(value):
            raise ConfigError(source, where, "a finite number", shown)
        return value
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(source, where, "a string", shown)
        return str(value)
    raise TypeError(f"no conversion for {hint!r}")  # a schema bug, not a user error


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if type(None) in args and typing.get_origin(inner[0]) is Literal:
            return _describe(inner[0]) + " or None"
        return _describe(inner[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return f"a non-empty list of {_describe(args[0])}"
    if dataclasses.is_dataclass(hint):
        required = [f.name for f in dataclasses.fields(hint) if f.default is dataclasses.MISSING]
        return f"a mapping with keys {', '.join(required)}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]
