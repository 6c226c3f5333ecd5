"""An event config's YAML read strictly: UTF-8 only, each key once, nesting and size bounded
(aliases expanded), every refusal a ConfigError with its line."""

from __future__ import annotations

from typing import Any

import yaml

from runner.errors import ConfigError

# A config is a few dozen values: these bounds refuse alias bombs and runaway nesting long
# before they cost time or memory, and keep every walk of the document far from Python's
# recursion limit.
MAX_DEPTH = 32
MAX_VALUES = 10_000
# What libyaml says when a document passes its own nesting limit (scanner or parser).
LIBYAML_DEPTH_PROBLEM = "exceeded maximum nesting depth"


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
    scanner (slow on deep flow nesting) see the document; libyaml's parser when present.

    libyaml has a nesting limit of its own (1,000 levels in the one PyYAML 6.0.4 bundles),
    and its scanner reads a whole flow collection ahead, so it can refuse a document before
    the 33rd level is ever handed over. Then the pure-Python parser, which has no limit and
    reads ahead at most 1,024 characters (0.2 s for the worst document), finds the line:
    the sentence and its line are the same with or without libyaml, whatever its limit.
    """
    try:
        _check_depth_with(getattr(yaml, "CSafeLoader", yaml.SafeLoader), text, source)
    except yaml.MarkedYAMLError as error:
        if error.problem != LIBYAML_DEPTH_PROBLEM:
            raise
        _check_depth_with(yaml.SafeLoader, text, source)


def _check_depth_with(loader: type, text: str, source: str) -> None:
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
