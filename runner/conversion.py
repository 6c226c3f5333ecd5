"""Typed values from a parsed YAML document: a dataclass's fields checked by name, presence
and type hint, every refusal a ConfigError naming the key path and what was expected."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from runner.errors import ConfigError
from runner.redaction import HIDDEN, is_secret


def require_mapping(value: Any, source: str, key_path: str) -> Mapping[str, Any]:
    """``value`` if it is a mapping, else a ConfigError at ``key_path``."""
    if not isinstance(value, Mapping):
        raise ConfigError(source, key_path, "a mapping of keys to values", type(value).__name__)
    return value


def reject_unknown(values: Mapping[str, Any], known: typing.Iterable[str], source: str,
                   prefix: str) -> None:
    """Refuse the first key of ``values`` not in ``known``, with the closest known one."""
    known = list(known)
    for key in values:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(
                source, where, "a known key" + did_you_mean(str(key), known),
                "an unknown key",
            )


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` with the choice closest to a mistyped ``word``, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# Field metadata: a field no config file sets (filled in by the program).
FILLED = "filled"


def build(cls: type, values: Mapping[str, Any], source: str, key_path: str) -> Any:
    """Build dataclass ``cls`` from ``values``, checking names, presence and types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)
              if f.name != "extra" and not f.metadata.get(FILLED)}
    reject_unknown(values, fields, source, key_path)
    arguments = {}
    for name, field in fields.items():
        where = f"{key_path}.{name}"
        if name not in values:
            required = (field.default is dataclasses.MISSING
                        and field.default_factory is dataclasses.MISSING)
            if required:
                raise ConfigError(source, where, describe(hints[name]))
            continue
        arguments[name] = _convert(values[name], hints[name], source, where,
                                   is_secret(field))
    return cls(**arguments)


def _convert(value: Any, hint: Any, source: str, where: str, hidden: bool) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    shown = HIDDEN if hidden else repr(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        # YAML writes None as null, but the seed writes ``hunger_policy: None``.
        if value == "None" and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        choices = typing.get_args(inner[0])
        if typing.get_origin(inner[0]) is Literal and value not in choices:
            expected = describe(hint) + did_you_mean(str(value), map(str, choices))
            raise ConfigError(source, where, expected, shown)
        return _convert(value, inner[0], source, where, hidden)
    if origin is Literal:
        if value not in args:
            expected = describe(hint) + did_you_mean(str(value), map(str, args))
            raise ConfigError(source, where, expected, shown)
        return value
    if origin is tuple:
        if not isinstance(value, list) or not value:
            raise ConfigError(source, where, describe(hint), type(value).__name__)
        return tuple(
            _convert(item, args[0], source, f"{where}[{i}]", hidden)
            for i, item in enumerate(value)
        )
    if dataclasses.is_dataclass(hint):
        return build(hint, require_mapping(value, source, where), source, where)
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


def describe(hint: Any) -> str:
    """What a value of type ``hint`` is, in words: what an error says was expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if type(None) in args and typing.get_origin(inner[0]) is Literal:
            return describe(inner[0]) + " or None"
        return describe(inner[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return f"a non-empty list of {describe(args[0])}"
    if dataclasses.is_dataclass(hint):
        required = [f.name for f in dataclasses.fields(hint) if f.default is dataclasses.MISSING]
        return f"a mapping with keys {', '.join(required)}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]
