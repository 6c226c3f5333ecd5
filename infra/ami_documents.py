"""Image Builder component documents of ami/: load, list ExecuteBash blocks, version."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .versions import content_version

DOCUMENTS_DIR = Path(__file__).resolve().parent.parent / "ami"
PARAMETER_REFERENCE = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")


@dataclass(frozen=True)
class BashBlock:
    """One ExecuteBash step: where it sits and the script it runs."""

    phase: str
    step: str
    script: str


@dataclass(frozen=True)
class ComponentDocument:
    """An AWSTOE document as text (what Image Builder gets) and as parsed YAML."""

    path: Path
    text: str
    content: dict[str, Any]

    @property
    def name(self) -> str:
        """The document's `name`."""
        return self.content["name"]

    @property
    def version(self) -> str:
        """Semantic version derived from the text: any edit gives a new version."""
        return content_version(self.text)

    @property
    def parameters(self) -> dict[str, dict[str, Any]]:
        """Declared parameters, name -> {type, default?, description?}."""
        declared: dict[str, dict[str, Any]] = {}
        for entry in self.content.get("parameters") or []:
            for name, spec in entry.items():
                declared[name] = spec
        return declared

    def steps(self) -> list[tuple[str, dict[str, Any]]]:
        """Every step of every phase as (phase name, step mapping)."""
        return [
            (phase["name"], step)
            for phase in self.content.get("phases") or []
            for step in phase.get("steps") or []
        ]

    def bash_blocks(self) -> list[BashBlock]:
        """The scripts of the ExecuteBash steps, commands joined as AWSTOE runs them."""
        return [
            BashBlock(phase, step["name"], "\n".join(step["inputs"]["commands"]))
            for phase, step in self.steps()
            if step.get("action") == "ExecuteBash"
        ]

    def referenced_parameters(self) -> set[str]:
        """Names used as {{ Name }} anywhere in the document."""
        return set(PARAMETER_REFERENCE.findall(self.text))


def load_document(path: Path) -> ComponentDocument:
    """Read and parse one component document."""
    text = path.read_text()
    return ComponentDocument(path=path, text=text, content=yaml.safe_load(text))


def load_documents(directory: Path = DOCUMENTS_DIR) -> dict[str, ComponentDocument]:
    """All documents of a directory, keyed by file stem (ramp-worker, gpu-drivers)."""
    return {path.stem: load_document(path) for path in sorted(directory.glob("*.yml"))}
