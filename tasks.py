"""Command-line tasks (``invoke --list``): thin wrappers over the runner package."""

from __future__ import annotations

import logging
import subprocess
import sys

from invoke import task
from invoke.exceptions import Exit

EVENT_CONFIG_HELP = {"event_config": "path of the event config.yml"}


def _console():
    from rich.console import Console

    # Piped output (CI logs, files) gets wide tables rather than rich's default 80 columns.
    return Console(width=None if sys.stdout.isatty() else 160)


def _load(event_config: str):
    from runner.config import ConfigError, load_event_config

    try:
        return load_event_config(event_config)
    except ConfigError as error:
        raise Exit(f"error: {error}", code=2) from None


def _logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(show_path=False, console=_console())])


@task(help=EVENT_CONFIG_HELP)
def check_config(c, event_config):
    """Validate an event config and print what it resolves to (exit 2 on error)."""
    config = _load(event_config)
    from rich.table import Table

    table = Table("key", "value", title=str(config.path), show_header=False)
    table.add_row("event", f"{config.ramp.event_name} ({config.ramp.problem_name})")
    for key, value in config.worker_dict().items():
        table.add_row(f"worker.{key}", repr(value))
    table.add_row("dispatcher.slots", str(config.dispatcher.slots))
    table.add_row("dispatcher.hunger_policy", repr(config.dispatcher.hunger_policy))
    table.add_row("ledger", str(config.ledger_path))
    _console().print(table)


@task(help={**EVENT_CONFIG_HELP, "verbose": "log every step"})
def dispatch(c, event_config, verbose=False):
    """Run the event's submissions until the hunger policy stops the dispatcher."""
    config = _load(event_config)
    _logging(verbose)
    from runner.dispatcher import Dispatcher, DispatcherBusy

    try:
        Dispatcher(config).run()
    except DispatcherBusy as error:
        raise Exit(f"error: {error}", code=2) from None
    _print_status(config)


@task(help={**EVENT_CONFIG_HELP, "name": "name of the submission (default: folder name)"})
def submit(c, path, event_config, name=None):
    """Add the submission folder PATH to the event."""
    config = _load(event_config)
    from runner.submissions import submit as submit_folder

    try:
        added = submit_folder(config, path, name)
    except ValueError as error:
        raise Exit(f"error: {error}", code=2) from None
    print(f"submitted {added}")


@task(help=EVENT_CONFIG_HELP)
def status(c, event_config):
    """Print every submission of the event with its state."""
    _print_status(_load(event_config))


@task(help={**EVENT_CONFIG_HELP, "split": "which bagged score ranks: test or valid"})
def leaderboard(c, event_config, split="test"):
    """Print the scored submissions, best first, with times and peak memory."""
    config = _load(event_config)
    from rich.table import Table

    from runner.leaderboard import rank
    from runner.ledger import Ledger
    from runner.ramptest import score_types

    types = score_types(config.worker.kit_dir)
    with Ledger(config.ledger_path) as ledger:
        entries = rank(ledger.all(), types, split)
    table = Table("rank", "submission", *(t.name for t in types), "train s", "valid s",
                  "test s", "peak MiB", title=f"{config.ramp.event_title or config.ramp.event_name}"
                  f" ({split})")
    for entry in entries:
        s = entry.submission
        table.add_row(str(entry.rank), s.name, *(f"{entry.scores[t.name]:.4f}" for t in types),
                      *(_number(v) for v in (s.train_time, s.valid_time, s.test_time,
                                             s.peak_memory_mb)))
    _console().print(table)


@task(help=EVENT_CONFIG_HELP)
def rerun(c, name, event_config):
    """Queue the finished submission NAME again."""
    config = _load(event_config)
    from runner.ledger import Ledger, TransitionError

    with Ledger(config.ledger_path) as ledger:
        try:
            ledger.rerun(name)
        except (KeyError, TransitionError) as error:
            raise Exit(f"error: {error}", code=2) from None
    print(f"{name} queued again")


@task(help=EVENT_CONFIG_HELP)
def create_conda_env(c, event_config):
    """Create the event's conda env from the kit's environment.yml."""
    _conda_env(event_config, "create")


@task(help=EVENT_CONFIG_HELP)
def update_conda_env(c, event_config):
    """Update the event's conda env from the kit's environment.yml."""
    _conda_env(event_config, "update")


@task(help={"k": "only tests matching this expression"})
def test(c, k=None):
    """Run the test suite."""
    argv = [sys.executable, "-m", "pytest"] + (["-k", k] if k else [])
    raise Exit(code=subprocess.call(argv))


def _conda_env(event_config, action):
    config = _load(event_config)
    from runner.local.conda import environment_command

    try:
        argv = environment_command(action, getattr(config.worker, "conda_env", None),
                                   config.worker.kit_dir)
    except ValueError as error:
        raise Exit(f"error: {error}", code=2) from None
    print(" ".join(argv))
    raise Exit(code=subprocess.call(argv))


def _print_status(config):
    from rich.table import Table

    from runner.ledger import Ledger

    table = Table("submission", "state", "attempts", "run s", "peak MiB", "error",
                  title=config.ramp.event_name)
    with Ledger(config.ledger_path) as ledger:
        for s in ledger.all():
            error = s.error_msg.strip().splitlines()[-1] if s.error_msg.strip() else ""
            table.add_row(s.name, s.state, str(s.attempts), _number(s.run_time),
                          _number(s.peak_memory_mb), error)
    _console().print(table)


def _number(value):
    return "" if value is None else f"{value:.1f}"


@task(help={"pipeline_arn": "Image Builder pipeline (default: the stack output pipelineArn)",
            "outputs_file": "JSON of `pulumi stack output --json`, when the pulumi CLI is absent",
            "stack": "Pulumi stack to read outputs from (default: the selected one)",
            "no_wait": "start the build, print the image ARN and return",
            "poll": "seconds between two looks at the image (default 30)"})
def build_ami(c, pipeline_arn=None, outputs_file=None, stack=None, no_wait=False, poll=30):
    """Run the AMI pipeline, follow the image and print the AMI (exit 1 if it fails)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from runner.aws.imagebuilder import ImageBuildError, make_client, start_build, wait_for_image

    pipeline_arn = pipeline_arn or _stack_pipeline_arn(outputs_file, stack)
    try:
        client = make_client(pipeline_arn)
        image_arn = start_build(client, pipeline_arn)
    except (ValueError, ClientError, BotoCoreError) as error:
        raise Exit(f"error: cannot start {pipeline_arn}: {error}", code=1) from None
    console = _console()
    console.print(f"building {image_arn}")
    if no_wait:
        return
    seen = []

    with console.status("PENDING") as display:
        def progress(state, elapsed):
            if not seen or seen[-1] != state:
                seen.append(state)
                console.log(state)
            display.update(f"{state}, {elapsed / 60:.0f} min")

        try:
            ami = wait_for_image(client, image_arn, on_progress=progress, poll_seconds=float(poll))
        except ImageBuildError as error:
            raise Exit(f"error: {error}", code=1) from None
        except (ClientError, BotoCoreError) as error:
            raise Exit(f"error: lost track of {image_arn}: {error}", code=1) from None
    console.print(f"AVAILABLE {ami.ami_id} {ami.ami_name} ({ami.region})")


@task(help={**EVENT_CONFIG_HELP,
            "outputs_file": "JSON of `pulumi stack output --json`, when the pulumi CLI is absent",
            "stack": "Pulumi stack to read outputs from (default: the selected one)"})
def aws_config(c, event_config, outputs_file=None, stack=None):
    """Write the stack outputs (AMI name, security group, key, region) into the worker section."""
    from runner.aws.stack_outputs import (
        StackOutputsError,
        read_stack_outputs,
        write_worker_settings,
    )

    try:
        written = write_worker_settings(event_config, read_stack_outputs(outputs_file, stack=stack))
    except StackOutputsError as error:
        raise Exit(f"error: {error}", code=2) from None
    for key, value in written.items():
        print(f"worker.{key}: {value}")


def _stack_pipeline_arn(outputs_file, stack):
    from runner.aws.stack_outputs import StackOutputsError, pipeline_arn, read_stack_outputs

    try:
        return pipeline_arn(read_stack_outputs(outputs_file, stack=stack))
    except StackOutputsError as error:
        raise Exit(f"error: {error}", code=2) from None


@task(help={**EVENT_CONFIG_HELP,
            "dry_run": "only list what would be released"})
def reap(c, event_config, dry_run=False):
    """Release what dead dispatchers of the event left: EC2 instances, runs on SSH hosts."""
    from runner.worker import worker_class

    config = _load(event_config)
    _logging(False)
    released = worker_class(config.worker.worker_type).reap_leftovers(
        config.worker_dict(), dry_run=dry_run)
    verb = "would release" if dry_run else "released"
    print(f"{verb} {len(released)}: {' '.join(released)}" if released else "nothing to release")


@task(help={"workers": "number of Dask workers (one thread each): one per RAMP slot",
            "tls": "require TLS, with a throw-away CA and certificates made for this cluster",
            "folder": "where the scheduler file, certificates, logs and worker files go"})
def dask_cluster(c, workers=2, tls=False, folder=".dask-cluster"):
    """Run a Dask scheduler and workers on 127.0.0.1 until Ctrl+C; print the worker: section."""
    from runner.dask.cluster import serve

    serve(folder, workers=int(workers), tls=tls)
