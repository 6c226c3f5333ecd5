"""A corpus of malformed configs, each with the one line it must produce.

``configs/event-*.yml`` are event configs, read by ``load_event_config``;
``configs/stack-*.yaml`` are Pulumi stack files, read by infra's ``read_stack_config`` as
``pulumi up`` would give them. Beside each, ``<name>.expected`` holds the line (for event
configs, what follows ``<file>: ``; ``{cpu_count}`` stands for this machine's count).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pulumi
import pytest
import yaml

from infra import stack_config
from runner.config import load_event_config
from runner.errors import ConfigError

CORPUS = Path(__file__).parent / "configs"
EVENTS = sorted(CORPUS.glob("event-*.yml"))
STACKS = sorted(CORPUS.glob("stack-*.yaml"))


def _expected(path: Path) -> str:
    return path.with_suffix(".expected").read_text().rstrip("\n").replace(
        "{cpu_count}", str(os.cpu_count()))


def test_the_corpus_is_large_enough():
    assert len(EVENTS) + len(STACKS) >= 30
    assert all(p.with_suffix(".expected").is_file() for p in EVENTS + STACKS)


@pytest.mark.parametrize("path", EVENTS, ids=[p.stem for p in EVENTS])
def test_event_config_gives_its_one_line(path):
    with pytest.raises(ConfigError) as caught:
        load_event_config(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message == f"{path}: {_expected(path)}"


@pytest.mark.parametrize("name", ["deep_brackets", "deep_block_mappings"])
def test_deep_nesting_gives_the_same_line_without_libyaml(name, monkeypatch):
    # libyaml stops at its own depth before ramp-runner's check; without it, the
    # pure-Python parser must give the very same line.
    monkeypatch.delattr(yaml, "CSafeLoader", raising=False)
    path = CORPUS / f"event-{name}.yml"
    with pytest.raises(ConfigError) as caught:
        load_event_config(path)
    assert str(caught.value) == f"{path}: {_expected(path)}"


def _pulumi_config(document: dict) -> tuple[dict[str, str], list[str]]:
    """The stack file's values as Pulumi hands them to a program: strings, structured
    values as JSON, ``secure:`` values as secrets."""
    values, secrets = {}, []
    for key, value in document["config"].items():
        if isinstance(value, dict) and "secure" in value:
            secrets.append(key)
            value = value["secure"]
        values[key] = value if isinstance(value, str) else json.dumps(value)
    return values, secrets


class _NoResources(pulumi.runtime.Mocks):
    """Reading the stack config creates no resource; the mocks only name the project."""

    def new_resource(self, args):
        raise AssertionError(f"no resource expected, got {args.typ}")

    def call(self, args):
        raise AssertionError(f"no call expected, got {args.token}")


@pytest.mark.parametrize("path", STACKS, ids=[p.stem for p in STACKS])
def test_stack_config_gives_its_one_line(path):
    values, secrets = _pulumi_config(yaml.safe_load(path.read_text()))
    pulumi.runtime.set_mocks(_NoResources(), project="ramp-runner", stack="faults")
    pulumi.runtime.set_all_config(values, secret_keys=secrets)
    try:
        with pytest.raises(stack_config.StackConfigError) as caught:
            stack_config.read_stack_config()
    finally:
        pulumi.runtime.set_all_config({})
    assert str(caught.value) == _expected(path)
