"""Command-line tasks of a clone (``invoke --list``): the ``ramp-runner`` program's tasks
(runner/cli.py), plus tasks that only make sense inside the repository.

``invoke dispatch -e examples/iris/config.yml`` and
``ramp-runner dispatch -e examples/iris/config.yml`` run the same task.
"""

from __future__ import annotations

# Every task of the installed program, by name: invoke collects the tasks it finds in
# this module, imported ones included.
from runner.cli import (  # noqa: F401
    aws_config,
    build_ami,
    check_config,
    create_conda_env,
    dask_cluster,
    dispatch,
    leaderboard,
    logs,
    reap,
    rerun,
    serve,
    status,
    submit,
    task,  # the command line's task, behind its error boundary, for the tasks below
    test,
    update_conda_env,
)

# --- Repository-only tasks -------------------------------------------------------------
# Define them below with @task (e.g. `bench`); invoke finds them without any registry.


@task(help={"quick": "fewer, shorter runs (about 3 minutes)"})
def bench(c, quick=False):
    """Benchmarks: ramp-runner vs ramp-engine vs a bare pool, scale, SSH, Dask (bench/)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
    from report import report

    print(report(quick))
