"""Pulumi's entry point.

Pulumi's Python host runs this directory as a script (``runpy.run_path(".")``), which puts
infra/ itself on sys.path, not its parent: add the parent so the program imports as the
``infra`` package, exactly as the tests import it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.program import main  # noqa: E402

main()
