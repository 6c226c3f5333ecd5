"""What AWSWorker and SSHWorker share: one ramp-test run on a host over a RemoteSession.

Remote layout, under the host's kit folder ``K`` (``remote_ramp_kit_folder``):
``K/submissions/<sub>/`` holds the uploaded submission (ramp-test writes its
``training_output`` there) and ``K/.ramp-runner/<sub>/`` the run's files: ``pid`` (the
session leader, so the whole tree can be killed), ``exit`` (written atomically when the
run ends), ``log``, ``supervise.py``, and what the supervisor leaves: ``peak_rss``,
``reason`` (why it stopped the run) and ``tmp`` (the run's /tmp).
The run is started detached (``setsid nohup``): a dropped connection does not end it.

With ``run_as_user`` the supervisor and ramp-test execute as that host user (``sudo -n -u``,
in a login shell with a clean environment: no ``SUDO_*`` variable, nothing of the login
user's), which owns only the run's submission folder and ``K/.ramp-runner/<sub>/run/`` (where
the supervisor writes ``peak_rss``, ``reason`` and ``tmp``); the rest stays the login
user's, who kills the run and takes the folders back through ``sudo -n`` (it needs
passwordless sudo, as ``ubuntu`` has on an AMI).

ramp-test runs under ``supervise.py`` with the worker's limits and, where bubblewrap works
on the host (asked at setup, with the run's own PATH and conda environment), in its
sandbox: the kit read-only, its ``submissions`` and ``.ramp-runner`` folders hidden but
for the run's own submission, which alone is writable; nothing else of the host's files
but the system's (``runner/supervise.py``). ``sandbox: auto`` on a host where it does
not work warns once per host and runs without it; ``required`` is the event's error.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import shlex
import stat
import time
from pathlib import Path
from typing import Any

from runner import blinded, gpus, ingest, ramptest, sandbox, supervise
from runner.errors import ConfigError, EventError
from runner.livelog import REFRESH_BYTES, LiveCopy
from runner.results import read_reason, run_end
from runner.ssh.session import CONNECTION_ERRORS, RemoteSession
from runner.ssh.settings import RemoteWorkerSection
from runner.worker import BaseWorker, RunArtifacts, RunState

logger = logging.getLogger("runner.worker")

RUN_FOLDER = ".ramp-runner"
# Blinded data on a host (runner.blinded), one folder per content, inside the kit folder
# so that the sandbox's view of the kit shows it.
BLINDED_FOLDER = ".ramp-runner-blinded"
# Files the upload leaves out: outputs of earlier local runs and bytecode.
NOT_UPLOADED = ("training_output", "__pycache__")
# Kill the session "$pid" (every process of a run shares the session its leader opened
# with setsid, even those that left its process group), and wait, bounded, until it is
# empty: SIGKILL is asynchronous and a dying parent may still fork.
KILL_SESSION = (
    'case "$pid" in ""|*[!0-9]*) ;; *) [ "$pid" -gt 1 ] && for i in $(seq 50); do '
    'pkill -KILL -s "$pid" || break; sleep 0.1; done;; esac; '
)
# The same as root, for a run of another user (and the root ``sudo`` between them); the
# pid file it reads is the login user's, in a folder the run cannot write.
KILL_SESSION_AS_ROOT = KILL_SESSION.replace("pkill", "sudo -n pkill")
# The environment a run user's login shell starts from (sudo -H gave HOME; UTF-8 as an SSH
# login has on Debian and Ubuntu): nothing else of sudo's (SUDO_*, what a host's sudoers
# keeps) nor of the login user's.
CLEAN_LOGIN = ('exec env -i HOME="$HOME" USER="$1" LOGNAME="$1" LANG=C.UTF-8 '
               'PATH=/usr/local/bin:/usr/bin:/bin bash -lc "$2"')
# Seconds a poll may take (one short command) before its connection is given up.
POLL_TIMEOUT = 60.0
# The poll's answer line carrying the log's new bytes: "log <start> <base64>".
LIVE_LINE = "log"
MIB = 1024 * 1024
# Conda installs an AMI may have when conda is not on the login PATH.
CONDA_HOMES = ("$HOME/miniforge3", "$HOME/miniconda3", "$HOME/miniconda", "/opt/conda")


def check_private_key(path: str, source: str, key_path: str) -> None:
    """Raise ConfigError unless ``path`` is a file this user reads and nobody else may read
    or write: OpenSSH refuses such a key too ("UNPROTECTED PRIVATE KEY FILE")."""
    expected = "a private key file readable by its owner only"
    try:
        mode = os.stat(Path(path).expanduser()).st_mode
    except OSError as error:
        raise ConfigError(source, key_path, expected, f"{path}: {error.strerror}") from None
    if not stat.S_ISREG(mode) or not os.access(Path(path).expanduser(), os.R_OK):
        raise ConfigError(source, key_path, expected, f"{path}: not a readable file")
    if mode & 0o077:
        raise ConfigError(source, key_path, f"{expected} (chmod 600 {path})",
                          f"mode {stat.S_IMODE(mode):o}")


def known_hosts_path(settings: RemoteWorkerSection, event_dir: str | None) -> Path:
    """The event's known_hosts file: ``known_hosts_file``, else ``<event_dir>/known_hosts``
    (``logs_dir`` for a worker made without a dispatcher)."""
    if settings.known_hosts_file:
        return Path(settings.known_hosts_file).expanduser()
    return Path(event_dir or settings.logs_dir) / "known_hosts"


def remote_removal(*paths: str) -> str:
    """A shell command removing ``paths`` on a host (nothing is mounted there: a run's disk
    lives in its supervisor's own mount namespace)."""
    return removal_of_words(" ".join(shlex.quote(path) for path in paths))


def removal_of_words(words: str) -> str:
    """``remote_removal`` of paths given as shell words (they may expand variables)."""
    return f"rm -rf {words}"


def kill_session(run_as_user: str | None) -> str:
    """The shell lines killing the session ``$pid`` of a run (as root for a run user's)."""
    return KILL_SESSION if run_as_user is None else KILL_SESSION_AS_ROOT


def as_run_user(script: str, run_as_user: str | None) -> str:
    """A command running ``script`` in a login shell, as ``run_as_user`` with a clean
    environment (or as the login user, unchanged)."""
    if run_as_user is None:
        return f"bash -lc {shlex.quote(script)}"
    return shlex.join(["sudo", "-n", "-H", "-u", run_as_user, "--", "bash", "-c", CLEAN_LOGIN,
                       "run", run_as_user, script])


def remote_gpus(session: RemoteSession, path_prefix: str | None) -> tuple[int, ...]:
    """The GPUs a host's ``nvidia-smi -L`` lists (with the run's PATH); GPUError when it
    cannot be run there."""
    lines = [f"export PATH={shlex.quote(path_prefix)}:\"$PATH\"" if path_prefix else "",
             shlex.join(gpus.LIST_COMMAND)]
    status, out, err = session.run(f"bash -lc {shlex.quote(chr(10).join(lines))}", 60)
    if status != 0:
        raise gpus.GPUError(f"{' '.join(gpus.LIST_COMMAND)} on {session!r} exited {status}: "
                            f"{(err or out).strip()[:300]}")
    return gpus.parse_listing(out)


class RemoteWorker(BaseWorker):
    """A run of ramp-test on a remote host; subclasses say how to get the host.

    Subclasses open ``self.session`` in ``setup`` (then call ``_upload``), and release
    the host in ``release_run``. ``_check_spot_notice`` adds the EC2 spot check to polls.
    """

    _check_spot_notice = False
    # A file whose modification time tells the host its dispatcher is alive (the AMI halts
    # an instance whose heartbeat is older than ten minutes); touched at start and each poll.
    heartbeat_file: str | None = None
    runs_ingestion = True
    metadata_url = "http://169.254.169.254"
    # Each poll is an SSH command on the host while RAMP times the run (RAMP's documentation
    # advises at least 60 s on AWS); ``time_between_collection`` overrides it.
    default_poll_seconds = 30.0

    def __init__(self, config: dict[str, Any], submission: str):
        super().__init__(config, submission)
        self.session: RemoteSession | None = None
        self.remote_kit = ""
        self.conda_env: str | None = None
        self.path_prefix: str | None = None
        self._poll_at = float("-inf")
        self._poll_state = ("running", None, False)
        self._exit_code: int | None = None
        # The run's own GPUs on the host (gpus_per_run of them).
        self.gpus: tuple[int, ...] = ()
        # The live copy of the run's log on the dispatcher's disk (runner.livelog), made at
        # launch and refreshed at each poll.
        self._live = LiveCopy(None, submission, 0)

    # -- remote paths and scripts ---------------------------------------------------------

    @property
    def run_dir(self) -> str:
        """The run's folder on the host."""
        return f"{self.remote_kit}/{RUN_FOLDER}/{self.submission}"

    @property
    def supervisor_dir(self) -> str:
        """Where the supervisor writes: the run's folder, or with a run user a folder of
        its own in it (the run's folder, with ``pid`` and ``exit``, is not the run's)."""
        return f"{self.run_dir}/run" if self.settings.run_as_user else self.run_dir

    @property
    def own_submission(self) -> str:
        """The run's submission folder on the host, the only one it writes."""
        return f"{self.remote_kit}/submissions/{self.submission}"

    def _upload(self) -> None:
        """Send the submission (without earlier outputs) and the supervisor in one stream,
        replacing what an earlier run of the same submission left on the host; then ask
        the host whether the sandbox works there (unless ``sandbox: off``)."""
        local = self.submission_folder()
        files = [(local, f"submissions/{self.submission}")]
        for path in sorted(local.rglob("*")):
            relative = path.relative_to(local)
            if not any(part in NOT_UPLOADED for part in relative.parts):
                files.append((path, f"submissions/{self.submission}/{relative.as_posix()}"))
        files.append((local, f"{RUN_FOLDER}/{self.submission}"))
        files.append((supervise.__file__, f"{RUN_FOLDER}/{self.submission}/supervise.py"))
        before = f"{self._stale_files()} && "
        if self.hidden_labels is not None:
            self._upload_blinded(self.hidden_labels.folder)
            # Beside the blinded data, where the sandbox shows it (the run's folder is hidden).
            files.append((ingest.__file__, f"{BLINDED_FOLDER}/ingest.py"))
            # The host's own data (test labels included) is hidden from the run: make sure
            # there is a folder to hide.
            before += f"mkdir -p {shlex.quote(f'{self.remote_kit}/data')} && "
        self.session.upload(files, self.remote_kit, before=before)
        try:
            self._hand_over()
            if self.settings.gpus_per_run and not self.gpus:
                # A host of its own (an instance): the first GPUs its nvidia-smi lists.
                self.gpus = gpus.of_slot(remote_gpus(self.session, self.path_prefix),
                                         self.settings.gpus_per_run, 0)
            self.sandboxed = self._host_sandbox()
        except EventError:
            # The subclass forgets the session on a setup error: clean the host first.
            self.session.run(self._stale_files(), 60)
            raise

    def _upload_blinded(self, folder: Path) -> None:
        """Send the blinded data to the host unless it is there already (once per host and
        content): into a folder of this run first, then renamed, so that no run reads a
        half-written one."""
        target = f"{self.remote_kit}/{BLINDED_FOLDER}/{folder.name}"
        if self.session.run(f"test -d {shlex.quote(target)}")[0] == 0:
            return
        staging = f"{BLINDED_FOLDER}/.{folder.name}.{self.submission}"
        self.session.upload(
            [(folder, staging), *((path, f"{staging}/{path.name}")
                                  for path in sorted(folder.iterdir()))],
            self.remote_kit, before=f"rm -rf {shlex.quote(f'{self.remote_kit}/{staging}')} && ")
        staged, target = shlex.quote(f"{self.remote_kit}/{staging}"), shlex.quote(target)
        # Another dispatcher may have renamed its copy first: then this one goes.
        self.session.run(f"mv -T {staged} {target} 2>/dev/null || rm -rf {staged}")

    def _stale_files(self) -> str:
        """The command removing the run's files from the host (as root: some may be the
        run user's)."""
        removal = remote_removal(self.own_submission, self.run_dir)
        return f"sudo -n {removal}" if self.settings.run_as_user else removal

    def _hand_over(self) -> None:
        """Give the run user its submission folder and the supervisor's folder, and let it
        read the supervisor; EventError when the host cannot (no such user, no sudo)."""
        user = self.settings.run_as_user
        if user is None:
            return
        run, own = shlex.quote(self.run_dir), shlex.quote(self.own_submission)
        mine = shlex.quote(self.supervisor_dir)
        # The folders holding every run's are walked through, not listed.
        parents = " ".join(shlex.quote(f"{self.remote_kit}/{name}")
                           for name in (RUN_FOLDER, "submissions"))
        status, out, err = self.session.run(
            f"sudo -n -u {user} true && chmod a+x {parents} && chmod 0755 {run} && "
            f"chmod 0644 {run}/supervise.py && mkdir -m 0755 {mine} && "
            f"sudo -n chown -R -h {user}: {own} {mine} && "
            f"{{ sudo -n -u {user} test -r {run}/supervise.py -a -w {own} -a -w {mine} "
            f"|| {{ echo 'the run user cannot reach the kit folder' >&2; false; }}; }}", 60)
        if status != 0:
            host = f"{self.session.user}@{self.session.host}:{self.session.port}"
            raise EventError(
                f"run_as_user: cannot hand the run over to user {user!r} on host {host} "
                f"(it needs that user, the kit folder readable by it and passwordless sudo "
                f"for {self.session.user}): {(err or out).strip()[:300]}")

    def _take_back(self) -> str:
        """Shell lines giving the run's folders back to the login user (links not followed),
        so that it reads and removes them; nothing without a run user."""
        if self.settings.run_as_user is None:
            return ""
        folders = f"{shlex.quote(self.own_submission)} {shlex.quote(self.supervisor_dir)}"
        return f'sudo -n chown -R -h "$(id -u):$(id -g)" {folders} 2>/dev/null; '

    def _host_sandbox(self) -> bool:
        """Whether runs on this host go in the sandbox (``runner.sandbox.use_sandbox`` with
        the host's own check)."""
        mode = self.settings.sandbox
        if mode == "off":
            return False
        check = shlex.join(["python", f"{self.run_dir}/supervise.py", "--check-sandbox"])
        script = "\n".join([*self._environment_lines(), check])
        status, out, err = self.session.run(as_run_user(script, self.settings.run_as_user))
        why = (out + err).strip().splitlines()[-1:] or [f"the check exited {status}"]
        host = f"{self.session.user}@{self.session.host}:{self.session.port}"
        probed = (status == 0, why[0].removeprefix("sandbox: does not work: ")[:500])
        return sandbox.use_sandbox(mode, type(self).__name__, probed, where=f"host {host}")

    def _supervised(self, argv: list[str]) -> list[str]:
        """``argv`` under the supervisor, with the worker's limits and, if on, the sandbox."""
        mine, kit = self.supervisor_dir, self.remote_kit
        own = self.own_submission
        # Other submissions and the runs' files share the kit folder on a host.
        hidden = [f"{kit}/submissions", f"{kit}/{RUN_FOLDER}"]
        if self.hidden_labels is not None:
            hidden.append(f"{kit}/data")
        options = sandbox.confinement(
            self.settings, self.sandboxed, read_only=(kit,), writable=(own,),
            tmp=f"{mine}/tmp", hidden=hidden, cpus=self.settings.dispatch.n_threads,
            gpus=self.gpus).options()
        return ["python", f"{self.run_dir}/supervise.py", "--peak-rss", f"{mine}/peak_rss",
                "--reason", f"{mine}/reason", *options, "--", *argv]

    def _environment_lines(self) -> list[str]:
        """Shell lines giving the run's PATH and conda environment."""
        lines = []
        if self.path_prefix:
            lines.append(f"export PATH={shlex.quote(self.path_prefix)}:\"$PATH\"")
        if self.conda_env:
            homes = " ".join(f'"{home}"' for home in CONDA_HOMES)
            env = shlex.quote(self.conda_env)
            lines += [
                f"command -v conda >/dev/null || for d in {homes}; do "
                '[ -x "$d/bin/conda" ] && PATH="$d/bin:$PATH" && break; done',
                f'eval "$(conda shell.bash hook)" && conda activate {env} '
                f"|| {{ echo 'cannot activate conda environment '{env}; exit 98; }}",
            ]
        return lines

    def _run_script(self) -> str:
        run = shlex.quote(self.run_dir)
        kit = self.remote_kit
        hidden = self.hidden_labels
        if hidden is None:
            command = ramptest.command(self.submission, kit, kit, f"{kit}/submissions")
        else:
            command = blinded.ingest_command(
                "python", f"{kit}/{BLINDED_FOLDER}/ingest.py", kit,
                f"{kit}/{BLINDED_FOLDER}/{hidden.folder.name}", f"{kit}/submissions",
                self.submission)
        argv = self._supervised(command)
        # The host's own environment, not the dispatcher's: only what a run sets is added.
        run_variables = ramptest.child_environment(self.settings.dispatch.n_threads, parent={})
        if self.gpus:
            run_variables.update(gpus.visible_devices(self.gpus))
        lines = [
            f"cd {shlex.quote(kit)} || exit 97",
            *self._environment_lines(),
            "export " + " ".join(f"{name}={shlex.quote(value)}"
                                 for name, value in run_variables.items()),
            shlex.join(argv),
        ]
        if self.settings.run_as_user is not None:
            # The login user's shell waits for the run user's and writes the exit code.
            lines = [as_run_user("\n".join(lines), self.settings.run_as_user)]
        lines.append(f"echo $? > {run}/exit.tmp && mv {run}/exit.tmp {run}/exit")
        return "\n".join(lines)

    def _kill_script(self) -> str:
        pid_file = shlex.quote(f"{self.run_dir}/pid")
        return (f"pid=$(cat {pid_file} 2>/dev/null); "
                f"{kill_session(self.settings.run_as_user)}")

    def _poll_script(self) -> str:
        run = shlex.quote(self.run_dir)
        script = (f"if [ -f {run}/exit ]; then echo exit $(cat {run}/exit); "
                  f"elif kill -0 $(cat {run}/pid 2>/dev/null) 2>/dev/null; then echo running; "
                  "else echo lost; fi")
        if self._check_spot_notice:
            # IMDSv2: a token first, then the notice (404 until AWS schedules a reclaim).
            url = shlex.quote(self.metadata_url)
            script += (
                f"; t=$(curl -sf -m 2 -X PUT {url}/latest/api/token "
                "-H 'X-aws-ec2-metadata-token-ttl-seconds: 60') && "
                f"curl -sf -m 2 -o /dev/null -H \"X-aws-ec2-metadata-token: $t\" "
                f"{url}/latest/meta-data/spot/instance-action && echo notice; true"
            )
        if self._live.path is not None:
            script += f"; {self._live_script()}"
        return self._beating(script)

    def _live_script(self) -> str:
        """Print the log's bytes past those seen, at most REFRESH_BYTES (the newest), as
        one line: ``log <start> <base64>``."""
        log, seen = shlex.quote(f"{self.run_dir}/log"), self._live.offset
        return (f"s=$(wc -c 2>/dev/null < {log} || echo 0); o=$((s - {REFRESH_BYTES})); "
                f"[ $o -lt {seen} ] && o={seen}; "
                f"printf '{LIVE_LINE} %s ' $o; tail -c +$((o + 1)) {log} 2>/dev/null "
                "| head -c $((s - o)) | base64 | tr -d '\\n'; echo")

    def _take_live(self, output: str) -> str:
        """Append the log's new bytes the poll brought to the live copy; the poll's answer
        without them."""
        kept = []
        for line in output.splitlines():
            words = line.split()
            if words[:1] != [LIVE_LINE]:
                kept.append(line)
            elif len(words) >= 2 and words[1].isdigit():
                try:
                    data = base64.b64decode(words[2] if len(words) > 2 else "", validate=True)
                except (binascii.Error, ValueError):
                    continue  # a garbled refresh: the next poll asks again
                self._live.add(data, int(words[1]))
        return "\n".join(kept)

    def _beating(self, script: str) -> str:
        """``script``, refreshing the host's heartbeat first when it keeps one."""
        if self.heartbeat_file is None:
            return script
        return f"touch {shlex.quote(self.heartbeat_file)} 2>/dev/null; {script}"

    # -- the run's execution interface ------------------------------------------------------

    def start_run(self) -> None:
        """Start ramp-test detached on the host (one round trip)."""
        self._live = LiveCopy(self.settings.dispatch.live_log_dir, self.submission,
                              self.settings.log_limit_mb * MIB)
        self._live.start()
        run = shlex.quote(self.run_dir)
        # "cd || exit" and not "&&": "a && b &" would background a subshell, and $! would
        # name it instead of the session leader.
        command = self._beating(
            f"cd {run} || exit 1; setsid nohup bash -lc {shlex.quote(self._run_script())} "
            f"> {run}/log 2>&1 < /dev/null & echo $! > {run}/pid")
        status, _, stderr = self.session.run(command)
        if status != 0:
            raise RuntimeError(f"{self!r}: could not start ramp-test: {stderr.strip()}")

    def _poll(self) -> tuple[str, int | None, bool]:
        """(state, exit code, spot notice), at most once per ``time_between_collection``."""
        interval = self.poll_seconds
        if time.monotonic() - self._poll_at < interval:
            return self._poll_state
        self._poll_at = time.monotonic()
        try:
            self._poll_state = self._parse_poll(self._take_live(self._poll_output()))
        except CONNECTION_ERRORS as error:
            logger.warning("%r: connection lost (%s); reconnecting", self, error)
            try:
                self.session.reconnect()
                self._poll_state = self._parse_poll(self._take_live(self._poll_output()))
            except CONNECTION_ERRORS as again:
                logger.warning("%r: host unreachable: %s", self, again)
                self._poll_state = ("lost", None, False)
        return self._poll_state

    def _poll_output(self) -> str:
        return self.session.run(self._poll_script(), POLL_TIMEOUT)[1]

    @staticmethod
    def _parse_poll(output: str) -> tuple[str, int | None, bool]:
        words = output.split()
        notice = "notice" in words
        if words[:1] == ["exit"] and len(words) > 1 and words[1].lstrip("-").isdigit():
            return "exit", int(words[1]), notice
        return (words[0] if words else "lost"), None, notice

    def poll_run(self) -> RunState:
        """Lost on a spot interruption notice or when the run vanished from the host;
        ended once it wrote its exit code."""
        state, code, notice = self._poll()
        if notice:
            logger.warning("%r: spot interruption notice", self)
        if state == "lost":
            logger.warning("%r: the run disappeared from the host", self)
        if notice or state == "lost":
            return RunState.LOST
        if state == "exit":
            self._exit_code = code
            return RunState.ENDED
        return RunState.RUNNING

    def stop_run(self) -> None:
        """Kill the remote process tree (best effort: the host may be gone)."""
        if self.session is not None and self.session.is_connected and self._started_at:
            try:
                self.session.run(self._kill_script(), 30)
            except CONNECTION_ERRORS as error:
                logger.warning("%r: could not kill the remote run: %s", self, error)

    def fetch_run(self, timed_out: bool) -> RunArtifacts:
        """Kill what is left of the run and bring back its log and outputs in one stream."""
        output = f"submissions/{self.submission}/training_output"
        run_folder = f"{RUN_FOLDER}/{self.submission}"
        supervisor_folder = self.supervisor_dir.removeprefix(f"{self.remote_kit}/")
        names = (f"set -- {run_folder}/log; "
                 f"for f in {supervisor_folder}/peak_rss {supervisor_folder}/reason {output}; "
                 'do [ -e "$f" ] && set -- "$@" "$f"; done; true')
        incoming = self.scratch / "incoming"
        incoming.mkdir()
        self.session.download(self.remote_kit, names, str(incoming),
                              before=self._kill_script() + self._take_back())
        run_files = incoming / RUN_FOLDER / self.submission
        supervisor_files = incoming / supervisor_folder
        self._live.catch_up_file(run_files / "log")
        peak_memory_mb = None
        if self.settings.memory_profiling and (supervisor_files / "peak_rss").exists():
            peak_memory_mb = float((supervisor_files / "peak_rss").read_text())
        exit_code = self._exit_code if self._exit_code is not None else 1
        end = run_end(read_reason(supervisor_files / "reason"), exit_code, timed_out,
                      where=f"on {self.session!r}: ")
        return RunArtifacts(run_files / "log", incoming / output, end, peak_memory_mb)

    def teardown(self) -> None:
        """Release the host (``release_run``), then remove the live log."""
        try:
            super().teardown()
        finally:
            self._live.remove()

    def _close_session(self) -> None:
        if self.session is not None:
            logger.info("%r: %d connection(s), %d round trips, %d bytes sent, %d received",
                        self, self.session.connections, self.session.round_trips,
                        self.session.bytes_sent, self.session.bytes_received)
            self.session.close()
