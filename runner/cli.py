"""The ``ramp-runner`` command line: one set of invoke tasks, shared by the installed console
script (``ramp-runner dispatch -e config.yml``) and the repository's ``tasks.py``
(``invoke dispatch -e config.yml``).

The tasks parse options and call runner/; what they print is drawn by runner.display.
Exit codes: 0 done; 1 the run failed (a submission of this dispatch ended in
``checking_error``, a build failed, tests failed); 2 usage or configuration (nothing was
started); 130 interrupted (Ctrl+C or SIGTERM; the dispatcher gave every claim back).
Errors are handled in one place, ``BoundedTask``, which every task is: any of the
project's own (``runner.errors.RunnerError``: a config, a ledger, a source, a worker) is one
line naming what is at fault, with its exit code; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import invoke
from invoke import Collection, Program
from invoke.exceptions import Exit, ParseError

from runner.errors import RunnerError

ENV_EVENT_CONFIG = "RAMP_EVENT_CONFIG"
EVENT_CONFIG_HELP = {"event_config": f"the event's config.yml (default: ${ENV_EVENT_CONFIG})"}
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class BoundedTask(invoke.Task):
    """A task behind the command line's one error boundary: the project's own errors
    become one ``error:`` line and their exit code, however the task is run (the
    ``ramp-runner`` program, ``invoke`` in a clone, or called from Python)."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except RunnerError as error:
            raise Exit(f"error: {error}", code=error.exit_code) from None


task = functools.partial(invoke.task, klass=BoundedTask)


def _config_path(event_config: str | None) -> str:
    path = event_config or os.environ.get(ENV_EVENT_CONFIG)
    if not path:
        raise Exit(f"error: no event config: give --event-config/-e FILE or set "
                   f"{ENV_EVENT_CONFIG}", code=EXIT_USAGE)
    return path


def _load(event_config: str | None):
    from runner.config import load_event_config

    return load_event_config(_config_path(event_config))


def _checked(event_config: str | None, console, config=None):
    """The loaded config, after every preflight check; warnings printed once."""
    from runner.preflight import preflight

    config = config or _load(event_config)
    warnings = preflight(config)
    for warning in warnings:
        console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False)
    return config


def _consoles():
    from runner.display import make_console

    return make_console(), make_console(stderr=True)


@task(help=EVENT_CONFIG_HELP)
def check_config(c, event_config=None):
    """Check the event config, its folders, environment and worker (exit 2 on a problem).

    Prints what the config resolves to."""
    from runner.display import config_table, spent_text
    from runner.ledger import Ledger

    out, err = _consoles()
    config = _checked(event_config, err)
    rows = []
    if config.ledger_path.exists():  # a ledger is made by dispatch; one already there must open
        with Ledger(config.ledger_path) as ledger:
            rows = ledger.all()
    out.print(config_table(config))
    budget = getattr(config.worker, "budget_usd", None)
    if any(row.instance_id for row in rows) or budget is not None:
        limit = "no budget" if budget is None else f"budget {budget:.2f} USD"
        out.print(f"spent: {spent_text(rows)} ({limit})", markup=False, highlight=False)


@task(help={**EVENT_CONFIG_HELP, "verbose": "show every step (always written to the log file "
            "beside the ledger)",
            "ramp_config": "a RAMP server's database config.yml: run the event's submissions "
                           "from its board, as `ramp-launch dispatcher` does"})
def dispatch(c, event_config=None, verbose=False, ramp_config=None):
    """Run the event's submissions until the hunger policy stops the dispatcher.

    Exit 1 when a submission of this dispatch ended in checking_error, 130 when interrupted.
    """
    from runner import livelog
    from runner.dispatcher import Dispatcher, DispatcherBusy
    from runner.display import DispatchView, configure_logging
    from runner.ramp_server import load_ramp_event
    from runner.redaction import install_redaction
    from runner.states import SubmissionState

    out, err = _consoles()
    config, source = (load_ramp_event(ramp_config, _config_path(event_config)) if ramp_config
                      else (None, None))
    config = _checked(event_config, err, config)
    log_file = config.ledger_path.with_suffix(".log")
    configure_logging(out if out.is_terminal else err, verbose, log_file)
    install_redaction(config)
    view = DispatchView(out, live=out.is_terminal, live_logs=livelog.folder(config.ledger_path))
    try:
        interrupted = view.run(Dispatcher(config, on_change=view.on_change, source=source))
    except DispatcherBusy:
        raise
    except Exception as error:  # the event could not be dispatched at all
        raise Exit(f"error: {type(error).__name__}: {error}", code=EXIT_FAILED) from None
    out.print(view.summary(), markup=False, highlight=False)
    out.print(f"log: {log_file}", style="dim", markup=False, highlight=False)
    if interrupted:
        raise Exit(code=EXIT_INTERRUPTED)
    if view.finals[SubmissionState.CHECKING_ERROR]:
        raise Exit(code=EXIT_FAILED)


# No short flags: -e means --event-config in every other task.
@task(auto_shortflags=False,
      help={"ramp_config": "the RAMP server's database config.yml (its sqlalchemy: section)",
            "events_dir": "the folder holding events/<event>/config.yml"})
def serve(c, ramp_config=None, events_dir=None):
    """Serve every open event of a RAMP board, one dispatcher each (`ramp-launch daemon`).

    Events opened later are picked up, closed ones stopped, dead dispatchers restarted; each
    writes events/<event>/dispatcher.log. Runs until Ctrl+C or SIGTERM."""
    if not ramp_config or not events_dir:
        raise Exit("error: give --ramp-config FILE and --events-dir FOLDER", code=EXIT_USAGE)
    from rich.text import Text

    from runner.display import configure_logging
    from runner.ramp_server import serve as serve_board
    from runner.untrusted import visible

    out, err = _consoles()
    configure_logging(err, verbose=False)

    def status_line(event: str, line: str) -> None:
        out.print(Text(visible(f"{time.strftime('%H:%M:%S')}  {event}: {line}")))

    serve_board(ramp_config, events_dir, on_status=status_line)


@task(help={**EVENT_CONFIG_HELP, "folder": "the submission folder to copy into the event",
            "name": "name of the submission (default: the folder's name)"})
def submit(c, folder=None, event_config=None, name=None):
    """Copy a submission folder into the event and queue it."""
    # Named, not positional: a positional argument would swallow --help.
    if not folder:
        raise Exit("error: give the submission folder: --folder/-f PATH", code=EXIT_USAGE)
    config = _load(event_config)
    from runner.submissions import submit as submit_folder

    try:
        added = submit_folder(config, folder, name)
    except ValueError as error:
        raise Exit(f"error: {error}", code=EXIT_USAGE) from None
    print(f"submitted {added}")


@task(help={**EVENT_CONFIG_HELP,
            "submission": "show this submission in full: history and whole error message"})
def status(c, event_config=None, submission=None):
    """Print every submission of the event with its state and the last line of its error."""
    from runner.display import runs_per_submission, status_table, submission_detail
    from runner.ledger import Ledger

    config = _load(event_config)
    if not config.ledger_path.exists():
        raise Exit(f"error: {config.ledger_path}: no ledger yet (nothing dispatched or "
                   "submitted)", code=EXIT_USAGE)
    out, _ = _consoles()
    with Ledger(config.ledger_path) as ledger:
        if submission is not None:
            try:
                found = ledger.get(submission)
            except KeyError as error:
                raise Exit(f"error: {error.args[0]}", code=EXIT_USAGE) from None
            out.print(submission_detail(found, ledger.transitions(submission)))
            return
        rows, runs = ledger.all(), runs_per_submission(ledger.transitions())
        positions = ledger.queue_positions()
    out.print(status_table(config.ramp.event_name, rows, runs, positions))


@task(help={**EVENT_CONFIG_HELP, "submission": "the running submission whose log to show",
            "follow": "keep showing what it prints until its run ends, then its state"})
def logs(c, event_config=None, submission=None, follow=False):
    """Show what a running submission printed so far (escaped, long lines cut).

    With --follow, keep showing it until the run ends, then print the state it ended in.
    Exit 2 when the submission is unknown or not running, 1 when its dispatcher stops first."""
    if not submission:
        raise Exit("error: give the submission: --submission/-s NAME", code=EXIT_USAGE)
    from runner import livelog
    from runner.display import last_line
    from runner.ledger import Ledger
    from runner.states import RUNNING_STATES
    from runner.untrusted import visible

    config = _load(event_config)
    if not config.ledger_path.exists():
        raise Exit(f"error: {config.ledger_path}: no ledger yet (nothing dispatched or "
                   "submitted)", code=EXIT_USAGE)
    with Ledger(config.ledger_path) as ledger:
        try:
            run = ledger.get(submission)
        except KeyError as error:
            raise Exit(f"error: {error.args[0]}", code=EXIT_USAGE) from None
        log = Path(config.worker.logs_dir) / submission / "log"
        if run.state not in RUNNING_STATES:
            raise Exit(f"error: {submission} is not running (it is {run.state}); the log of "
                       f"its last run is {log}", code=EXIT_USAGE)
        alive = functools.partial(livelog.dispatcher_alive, config.ledger_path)
        if not alive():
            raise Exit(f"error: {submission} is {run.state} but no dispatcher runs this "
                       "event (the next dispatch puts it back in the queue)", code=EXIT_USAGE)

        def still_running() -> bool:
            now = ledger.get(submission)
            # A lost run goes back to new with one more attempt: that run is over.
            return now.state in RUNNING_STATES and now.attempts == run.attempts

        def show(line: str) -> None:
            print(line, flush=True)

        followed = livelog.follow(livelog.live_path(livelog.folder(config.ledger_path),
                                                    submission),
                                  still_running, show, follow, dispatcher=alive)
        end = ledger.get(submission)
    if not followed:
        raise Exit(f"error: the dispatcher stopped while {submission} was {end.state}",
                   code=EXIT_FAILED)
    if follow:
        why = last_line(end.error_msg) if end.state not in RUNNING_STATES else ""
        print(visible(f"{submission}: {end.state}" + (f": {why}" if why else "")), flush=True)


@task(help={**EVENT_CONFIG_HELP, "split": "which bagged score ranks: test (default) or valid"})
def leaderboard(c, event_config=None, split="test"):
    """Print the scored submissions, best first, with times and peak memory.

    Ties on the first score type are broken by the next ones."""
    from runner.display import leaderboard_table
    from runner.leaderboard import SPLITS, rank
    from runner.ledger import Ledger
    from runner.rescoring import score_types

    if split not in SPLITS:
        raise Exit(f"error: --split {split!r}: expected one of {', '.join(SPLITS)}",
                   code=EXIT_USAGE)
    config = _load(event_config)
    try:
        types = score_types(config.worker.kit_dir)
    except (ValueError, OSError, ImportError) as error:
        raise Exit(f"error: {config.path}: worker.kit_dir: expected a kit whose problem.py "
                   f"declares score_types, got {error}", code=EXIT_USAGE) from None
    if not config.ledger_path.exists():
        raise Exit(f"error: {config.ledger_path}: no ledger yet (nothing dispatched)",
                   code=EXIT_USAGE)
    with Ledger(config.ledger_path) as ledger:
        entries = rank(ledger.all(), types, split)
    title = f"{config.ramp.event_title or config.ramp.event_name} ({split})"
    _consoles()[0].print(leaderboard_table(title, entries, types))


@task(help={**EVENT_CONFIG_HELP, "submission": "the finished submission to queue again"})
def rerun(c, submission=None, event_config=None):
    """Queue a finished submission again (its results and attempts are forgotten)."""
    if not submission:
        raise Exit("error: give the submission: --submission/-s NAME", code=EXIT_USAGE)
    config = _load(event_config)
    from runner.ledger import Ledger

    with Ledger(config.ledger_path) as ledger:
        try:
            ledger.rerun(submission)
        except KeyError as error:
            raise Exit(f"error: {error}", code=EXIT_USAGE) from None
    print(f"{submission} queued again")


@task(help=EVENT_CONFIG_HELP)
def create_conda_env(c, event_config=None):
    """Create the event's conda env from the kit's environment.yml."""
    _conda_env(event_config, "create")


@task(help=EVENT_CONFIG_HELP)
def update_conda_env(c, event_config=None):
    """Update the event's conda env from the kit's environment.yml."""
    _conda_env(event_config, "update")


def _conda_env(event_config, action):
    config = _load(event_config)
    from runner.local.conda import environment_command

    try:
        argv = environment_command(action, getattr(config.worker, "conda_env", None),
                                   config.worker.kit_dir)
    except ValueError as error:
        raise Exit(f"error: {error}", code=EXIT_USAGE) from None
    print(" ".join(argv))
    raise Exit(code=subprocess.call(argv))


@task(help={"k": "only tests matching this expression",
            "latest": "run the suite on the newest versions pyproject.toml allows (in "
                      ".venv-latest, made by `.ci/bootstrap --latest`) instead of the lock"})
def test(c, k=None, latest=False):
    """Run the test suite; options after `--` go to pytest (`test -- -x tests/test_cli.py`)."""
    # invoke keeps what follows `--` to itself (its parse result's remainder), out of a
    # task's reach: read it from argv, which both `invoke` and `ramp-runner` leave intact.
    extra = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    python = sys.executable
    if latest:
        clone = Path(__file__).resolve().parents[1]
        bootstrap = clone / ".ci" / "bootstrap"
        if not bootstrap.exists():
            raise Exit(f"error: --latest: {bootstrap}: not found (it needs a clone of the "
                       "repository)", code=EXIT_USAGE)
        if subprocess.call(["bash", str(bootstrap), "--latest"]) != 0:
            raise Exit("error: --latest: .ci/bootstrap --latest failed", code=EXIT_FAILED)
        python = str(clone / ".venv-latest" / "bin" / "python")
    argv = [python, "-m", "pytest", *(["-k", k] if k else []), *extra]
    raise Exit(code=subprocess.call(argv))


@task(help={"pipeline_arn": "Image Builder pipeline (default: the stack output pipelineArn)",
            "outputs_file": "JSON of `pulumi stack output --json`, when the pulumi CLI is absent",
            "stack": "Pulumi stack to read outputs from (default: the selected one)",
            "no_wait": "start the build, print the image ARN and return",
            "poll": "seconds between two looks at the image (default 30)"})
def build_ami(c, pipeline_arn=None, outputs_file=None, stack=None, no_wait=False, poll=30):
    """Run the AMI pipeline, follow the image and print the AMI (exit 1 if it fails)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from runner.aws.imagebuilder import make_client, start_build, wait_for_image
    from runner.aws.stack_outputs import pipeline_arn as stack_pipeline_arn
    from runner.aws.stack_outputs import read_stack_outputs

    outputs = (read_stack_outputs(outputs_file, stack=stack)
               if outputs_file or not pipeline_arn else {})
    pipeline_arn = pipeline_arn or stack_pipeline_arn(outputs)
    tags = outputs.get("imageTags") or {}
    console = _consoles()[0]
    if not tags:
        console.print("warning: no stack outputs with imageTags: the image is built untagged, "
                      "and the stack's lifecycle policy will not delete it", style="yellow",
                      markup=False, highlight=False)
    try:
        client = make_client(pipeline_arn)
        image_arn = start_build(client, pipeline_arn, tags=tags)
    except (ValueError, ClientError, BotoCoreError) as error:
        raise Exit(f"error: cannot start {pipeline_arn}: {error}", code=EXIT_FAILED) from None
    console.print(f"building {image_arn}", markup=False)
    if no_wait:
        return
    seen = []

    with console.status("PENDING") as display:
        def progress(state, elapsed):
            if not seen or seen[-1] != state:
                seen.append(state)
                console.log(state, markup=False)
            display.update(f"{state}, {elapsed / 60:.0f} min")

        try:
            ami = wait_for_image(client, image_arn, on_progress=progress, poll_seconds=float(poll))
        except (ClientError, BotoCoreError) as error:
            raise Exit(f"error: lost track of {image_arn}: {error}", code=EXIT_FAILED) from None
    console.print(f"AVAILABLE {ami.ami_id} {ami.ami_name} ({ami.region})", markup=False)


@task(help={**EVENT_CONFIG_HELP,
            "outputs_file": "JSON of `pulumi stack output --json`, when the pulumi CLI is absent",
            "stack": "Pulumi stack to read outputs from (default: the selected one)"})
def aws_config(c, event_config=None, outputs_file=None, stack=None):
    """Write the stack outputs (AMI name, security group, key, region) into the worker section."""
    from runner.aws.stack_outputs import read_stack_outputs, write_worker_settings

    written = write_worker_settings(_config_path(event_config),
                                    read_stack_outputs(outputs_file, stack=stack))
    for key, value in written.items():
        print(f"worker.{key}: {value}")


@task(help={**EVENT_CONFIG_HELP, "dry_run": "only list what would be released"})
def reap(c, event_config=None, dry_run=False):
    """Release what dead dispatchers of the event left: EC2 instances, runs on SSH hosts.

    On AWS also a live dispatcher's leaks: instances past their deadline tag, and those
    no running submission of the ledger claims."""
    from runner.display import configure_logging
    from runner.redaction import install_redaction
    from runner.worker import worker_class

    config = _load(event_config)
    configure_logging(_consoles()[1], verbose=False)
    install_redaction(config)
    aws = config.worker.worker_type == "aws"
    more = {"claims": functools.partial(_claims, config)} if aws else {}
    released = worker_class(config.worker.worker_type).reap_leftovers(
        config.worker_dict(), dry_run=dry_run, **more)
    verb = "would release" if dry_run else "released"
    print(f"{verb} {len(released)}: {' '.join(released)}" if released else "nothing to release")


def _claims(config) -> dict[str, set[str]]:
    """Every dispatcher the ledger knows, with the submissions it runs now (none without
    a ledger)."""
    from runner.ledger import Ledger
    from runner.states import RUNNING_STATES

    if not config.ledger_path.exists():
        return {}
    claims: dict[str, set[str]] = {}
    with Ledger(config.ledger_path) as ledger:
        for row in ledger.all():
            runs = claims.setdefault(row.worker, set())
            if row.state in RUNNING_STATES:
                runs.add(row.name)
    return claims


@task(help={"workers": "number of Dask workers (one thread each): one per RAMP slot",
            "tls": "require TLS, with a throw-away CA and certificates made for this cluster",
            "folder": "where the scheduler address, certificates, logs and worker files go",
            "port": "the scheduler's port (default 8786, as the example's config-dask.yml "
                    "expects; with --slurm, the port of the event's dask_scheduler; 0 picks "
                    "a free one)",
            "slurm": "run the Dask workers as Slurm jobs sized for the event (-e): one run "
                     "per job, up to its n_workers, none while no submission waits",
            "scheduler_host": "with --slurm: the address the compute nodes reach the "
                              "scheduler at (default: this machine's outward address)",
            **EVENT_CONFIG_HELP})
def dask_cluster(c, workers=2, tls=False, folder=".dask-cluster", port=None, slurm=False,
                 scheduler_host=None, event_config=None):
    """Run a Dask scheduler and workers (on 127.0.0.1, or as Slurm jobs) until Ctrl+C;
    print the worker: section."""
    port = None if port is None else int(port)
    if slurm:
        from runner.dask.slurm import serve as serve_slurm

        serve_slurm(_load(event_config), folder, host=scheduler_host, port=port, tls=tls)
        return
    from runner.dask.cluster import DEFAULT_PORT, serve

    serve(folder, workers=int(workers), tls=tls, port=DEFAULT_PORT if port is None else port)


namespace = Collection(check_config, dispatch, serve, submit, status, logs, leaderboard, rerun,
                       create_conda_env, update_conda_env, test, build_ami, aws_config, reap,
                       dask_cluster)


class RampRunnerProgram(Program):
    """invoke's Program with the conventional exit codes: 2 for usage, 130 for Ctrl+C."""

    def parse_core(self, argv):
        try:
            super().parse_core(argv)
        except ParseError as error:
            raise Exit(f"error: {error}", code=EXIT_USAGE) from None

    def parse_tasks(self):
        try:
            super().parse_tasks()
        except ParseError as error:
            raise Exit(f"error: {error}", code=EXIT_USAGE) from None

    def execute(self):
        try:
            super().execute()
        except KeyboardInterrupt:
            raise Exit(code=EXIT_INTERRUPTED) from None


def _version() -> str:
    try:
        return version("ramp-runner")
    except PackageNotFoundError:
        return "unknown"


program = RampRunnerProgram(namespace=namespace, name="ramp-runner", binary="ramp-runner",
                            version=_version())


def main() -> None:
    """Entry point of the ``ramp-runner`` console script."""
    program.run()


if __name__ == "__main__":  # what `serve` starts for each event: python -m runner.cli dispatch
    main()
