"""AWSWorker (``worker_type: aws``): one EC2 instance per submission, driven over SSH.

With ``reuse_instances`` an instance serves up to ``max_runs`` submissions of one
dispatcher in turn (``runner.aws.pool`` keeps it between them, at most ``idle_minutes``):
only after a run that ended cleanly in the sandbox and whose files were wiped from it;
a run killed at its timeout, lost, or whose connection broke ends its instance.

setup = newest AMI + launch (spot or on-demand) + SSH ready + upload; the instance is
terminated if any of it fails, and always in ``teardown``. The instance also halts
itself (and, launched with shutdown behaviour ``terminate``, ends) ``timeout +
self_destruct_margin`` seconds after boot, so a dead dispatcher leaks nothing for long.
That timer is a user-data script: only an AMI whose boot runs cloud-init (Ubuntu's do)
starts it; the margin (>= 10 minutes) covers boot, upload and collection. The same time
is the instance's deadline tag, which the stack's reaper enforces from outside, and the
AMI's heartbeat timer halts it 10 minutes after the last poll.

After the termination, ``usage`` says what the instance cost (``runner.aws.cost``); the
dispatcher keeps it in the ledger.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import psutil
from botocore.exceptions import BotoCoreError, ClientError

from runner.aws import cost, ec2, pool
from runner.aws.settings import AWSWorkerSection
from runner.errors import InfrastructureError
from runner.ssh.remote_worker import RemoteWorker, check_private_key, known_hosts_path
from runner.ssh.session import CONNECTION_ERRORS, RemoteSession, forget_host
from runner.worker import RunArtifacts, RunState, WorkerStatus

logger = logging.getLogger("runner.worker")
# How long a new run waits for an instance whose run ended and whose outputs are being
# fetched (seconds: a download), rather than launching one.
RETURN_WAIT_SECONDS = 120.0

def owner_token() -> str:
    """``host:pid:start-time`` of this process, tagged on the instances it launches."""
    return f"{socket.gethostname()}:{os.getpid()}:{int(psutil.Process().create_time())}"


def owner_alive(token: str | None) -> bool:
    """Whether the process named by an owner tag still runs (other hosts: assumed so)."""
    try:
        host, pid, started = (token or "").rsplit(":", 2)
        pid, started = int(pid), int(started)
    except ValueError:
        return False
    if host != socket.gethostname():
        return True
    try:
        return int(psutil.Process(pid).create_time()) == started
    except psutil.Error:
        return False


def _client(section: AWSWorkerSection) -> Any:
    return ec2.client(section.region_name, section.profile_name, section.access_key_id,
                      section.secret_access_key)


class AWSWorker(RemoteWorker):
    """Run a submission on its own EC2 instance, from the newest AMI of the event."""

    settings_class = AWSWorkerSection
    # The AMI's contract (infra/worker_contract.py, stack output heartbeatFile): infra/ and
    # runner/ share no import, so the path is written on both sides.
    heartbeat_file = "/run/ramp-runner/heartbeat"

    def __init__(self, config: dict[str, Any], submission: str):
        super().__init__(config, submission)
        self.instance: ec2.Instance | None = None
        self.usage: cost.InstanceUsage | None = None
        self._ec2: Any = None
        # With reuse_instances: the runs the instance served before this one, when this
        # run's share of it began, when its self-destruct halts it, and whether the run
        # was killed at its timeout (its instance is then not reused).
        self._warm_runs = 0
        self._share_since: float | None = None
        self._self_destruct_at = 0.0
        self._timed_out = False
        self._returning = False

    def setup(self) -> None:
        """Take a warm instance (``reuse_instances``) or find the AMI, launch and wait for
        SSH; upload; terminate the instance on any failure."""
        section = self.settings
        self.remote_kit = section.remote_ramp_kit_folder.rstrip("/")
        self.conda_env, self.path_prefix = section.conda_env, section.remote_path_prefix
        self._ec2 = _client(section)
        if not self._resume_warm():
            self._launch()
        try:
            self._upload()
        except BaseException:
            self._terminate()
            raise
        super().setup()

    def _submission_tags(self) -> dict[str, str]:
        """The tags naming the submission the instance runs (moved when it is reused)."""
        event = self.settings.dispatch.event_name or ""
        return {"Name": f"ramp-runner {event} {self.submission}",
                ec2.TAG_SUBMISSION: self.submission}

    def _tags(self, lifetime: float) -> dict[str, str]:
        return {
            **self._submission_tags(),
            ec2.TAG_EVENT: self.settings.dispatch.event_name or "",
            ec2.TAG_DISPATCHER: self.settings.dispatch.dispatcher_id or "",
            ec2.TAG_OWNER: owner_token(),
            # Counted from before the launch: the self-destruct counts from the later boot.
            ec2.TAG_DEADLINE: ec2.deadline_tag(time.time() + lifetime),
        }

    def _lifetime(self) -> float:
        """Seconds from boot to the instance's self-destruct: one run, or as many as a
        reused instance may serve with their idle waits."""
        section, run = self.settings, float(self.timeout)
        if section.reuse_instances is not None:
            reuse = section.reuse_instances
            run = reuse.max_runs * (run + reuse.idle_seconds)
        return run + section.self_destruct_margin

    def _launch(self) -> None:
        """Launch a new instance from the event's AMI and connect to it."""
        section = self.settings
        if section.ami_image_id:
            image_id = ec2.pinned_ami(self._ec2, section.ami_image_id)
        else:
            image_id = ec2.newest_ami(self._ec2, section.ami_image_name)
        lifetime = self._lifetime()
        tags = self._tags(self.timeout + section.self_destruct_margin)
        if section.challenge_name:
            tags[ec2.TAG_CHALLENGE] = section.challenge_name
        if section.reuse_instances is not None:
            tags[ec2.TAG_REUSE] = str(section.reuse_instances.max_runs)
        self.instance = ec2.launch_instance(
            self._ec2,
            image_id=image_id,
            instance_type=section.instance_type,
            key_name=section.key_name,
            security_group=section.security_group,
            tags=tags,
            spot=section.use_spot_instance,
            spot_fallback_on_demand=section.spot_fallback_on_demand,
            user_data=ec2.self_destruct_user_data(lifetime),
            launch_template_id=section.launch_template_id,
        )
        self._share_since = self.instance.launched_at
        self._self_destruct_at = self.instance.launched_at + lifetime
        self._check_spot_notice = self.instance.spot
        try:
            # A shutdown (kill) must not wait for a slow boot: it sets _wakeup.
            ec2.wait_until_running(self._ec2, self.instance.instance_id, stop=self._wakeup)
            host, port = ec2.instance_address(self._ec2, self.instance.instance_id)
            known_hosts = known_hosts_path(section, section.dispatch.event_dir)
            forget_host(known_hosts, host, port)  # a new machine: trust its first key
            self.session = RemoteSession(host, section.ami_user_name, section.key_path, port,
                                         known_hosts=known_hosts)
            self.session.connect(ready_timeout=section.ssh_ready_timeout, stop=self._wakeup)
        except BaseException:
            self._terminate()
            raise

    # -- reuse_instances ------------------------------------------------------------------

    def _pool_key(self) -> str:
        return self.settings.dispatch.dispatcher_id or ""

    def _resume_warm(self) -> bool:
        """Take a warm instance of this dispatcher that can hold this run, refresh its
        tags and connect; False when there is none (those found unfit are terminated)."""
        if self.settings.reuse_instances is None:
            return False
        section = self.settings
        while (warm := pool.take(self._pool_key(), RETURN_WAIT_SECONDS,
                                 self._wakeup)) is not None:
            unfit = self._unfit(warm)
            if unfit is None:
                try:
                    # The tags the stack's dispatcher policy (MoveDeadline) lets change
                    # after the launch: the deadline and this submission.
                    deadline = time.time() + self.timeout + section.self_destruct_margin
                    ec2.tag(self._ec2, warm.instance.instance_id,
                            {ec2.TAG_DEADLINE: ec2.deadline_tag(deadline),
                             **self._submission_tags()})
                    self.session = RemoteSession(
                        warm.host, section.ami_user_name, section.key_path, warm.port,
                        known_hosts=known_hosts_path(section, section.dispatch.event_dir))
                    self.session.connect(stop=self._wakeup)
                except (*CONNECTION_ERRORS, BotoCoreError, ClientError) as error:
                    self._close_session()
                    self.session = None
                    unfit = f"unreachable: {' '.join(str(error).split())[:200]}"
            if unfit is not None:
                pool.retire(warm, unfit)
                continue
            self.instance, self._warm_runs = warm.instance, warm.runs
            self._share_since, self._self_destruct_at = warm.idle_since, warm.self_destruct_at
            self._check_spot_notice = warm.instance.spot
            logger.info("%r: reusing instance %s (run %d)", self, warm.instance.instance_id,
                        warm.runs + 1)
            return True
        return False

    def _unfit(self, warm: pool.WarmInstance) -> str | None:
        """Why ``warm`` cannot take this run, or None."""
        now = time.time()
        if now - warm.idle_since > self.settings.reuse_instances.idle_seconds:
            return "idle too long (its heartbeat is old)"
        if warm.self_destruct_at < now + self.timeout + self.settings.self_destruct_margin:
            return "its self-destruct would come before this run ends"
        try:
            state = ec2.instance_state(self._ec2, warm.instance.instance_id)
        except (BotoCoreError, ClientError) as error:
            return f"EC2 did not say its state: {' '.join(str(error).split())[:200]}"
        return None if state == "running" else f"it is {state or 'unknown to EC2'}"

    def _keep_warm(self) -> None:
        """Put the instance in the dispatcher's pool if this run ended cleanly and its
        files are wiped from it (else ``release_run`` terminates it)."""
        if (not self._may_return() or self.session is None
                or not self.session.is_connected):
            return
        try:
            # The run's files go; the heartbeat is fresh for the idle wait.
            status, _, err = self.session.run(self._beating(self._stale_files()), 60)
        except CONNECTION_ERRORS as error:
            logger.warning("%r: could not wipe the run's files: %s", self, error)
            return
        if status != 0:
            logger.warning("%r: could not wipe the run's files: %s", self, err.strip()[:300])
            return
        instance, self.instance = self.instance, None
        host, port = self.session.host, self.session.port
        ended_at = time.time()
        self.usage = self._usage(instance, ended_at)
        self._close_session()
        self.session = None
        pool.give_back(self._pool_key(), pool.WarmInstance(
            instance, self._ec2, host, port, self._warm_runs + 1, ended_at,
            self._self_destruct_at), self.settings.reuse_instances.idle_seconds)

    def _may_return(self) -> bool:
        """Whether the instance may serve another run: its run ended by itself (not
        killed, lost, or at its timeout), in the sandbox, below ``max_runs``."""
        return (self.instance is not None and self.known_status is WorkerStatus.FINISHED
                and self._reusable())

    def _reusable(self) -> bool:
        reuse = self.settings.reuse_instances
        return (reuse is not None and self.sandboxed and not self._timed_out
                and self._warm_runs + 1 < reuse.max_runs)

    def poll_run(self) -> RunState:
        """The run's state; at its end, the instance is announced to the pool (the next
        run waits for it while the outputs come back)."""
        state = super().poll_run()
        if state is RunState.ENDED and not self._returning and self._reusable():
            self._returning = True
            pool.returning(self._pool_key(), +1)
        return state

    def fetch_run(self, timed_out: bool) -> RunArtifacts:
        """Bring the run back; then, if it ended cleanly, wipe its files from the instance
        and hand it to the next run at once (``reuse_instances``)."""
        self._timed_out = timed_out
        try:
            artifacts = super().fetch_run(timed_out)
            self._keep_warm()
            return artifacts
        finally:
            self._not_returning()

    def _not_returning(self) -> None:
        if self._returning:
            self._returning = False
            pool.returning(self._pool_key(), -1)

    @classmethod
    def close_shared(cls, config: dict[str, Any]) -> None:
        """Terminate the dispatcher's warm instances."""
        drained = pool.drain(cls.settings_of(config).dispatch.dispatcher_id or "")
        if drained:
            logger.info("terminated %d warm instance(s): %s", len(drained), ", ".join(drained))

    def _terminate(self) -> None:
        """Close the session and terminate the instance; when EC2 cannot be reached or
        refuses, say so in one line (the instance's own timer and ``reap`` remain)."""
        self._close_session()
        if self.instance is None:
            return
        instance, self.instance = self.instance, None
        instance_id = instance.instance_id
        try:
            ec2.terminate(self._ec2, [instance_id])
            self.usage = self._usage(instance, time.time())
        except (BotoCoreError, ClientError, InfrastructureError) as error:
            lifetime = self.timeout + self.settings.self_destruct_margin
            logger.error("%r: could not terminate instance %s: %s; it halts itself %g s "
                         "after its boot at the latest, and the next dispatch or `invoke reap` "
                         "terminates it once EC2 answers", self, instance_id,
                         " ".join(str(error).split()), lifetime)

    def _usage(self, instance: ec2.Instance, ended_at: float) -> cost.InstanceUsage:
        """What ``instance`` cost, terminated at ``ended_at``."""
        # This run's share: the whole life of an instance used once (runner.aws.cost).
        since = self._share_since if self._share_since is not None else instance.launched_at
        price = None
        if instance.spot:
            price = cost.spot_price(self._ec2, instance.instance_id, instance.instance_type,
                                    since, ended_at)
        if price is None:  # on-demand, or a spot price EC2 did not give: the table's
            price = self.settings.price_per_hour(instance.instance_type)
        minimum = cost.MINIMUM_BILLED_SECONDS if self._warm_runs == 0 else 0.0
        return cost.InstanceUsage(instance.instance_id, instance.instance_type,
                                  instance.market, since, ended_at, price, minimum)

    def release_run(self) -> None:
        """Terminate the instance unless ``fetch_run`` handed it to the next run, whatever
        happened before (after a failed collect too)."""
        self._not_returning()
        self._terminate()  # nothing left to do when fetch_run handed the instance on

    @classmethod
    def preflight(cls, config: dict[str, Any]) -> list[str]:
        """Refuse a missing private key file, or one others may read."""
        check_private_key(cls.settings_of(config).key_path, cls.config_source(config),
                          "worker.key_path")
        return []

    @classmethod
    def reap_leftovers(cls, config: dict[str, Any], dry_run: bool = False,
                       claims: Callable[[], dict[str, set[str]]] | None = None) -> list[str]:
        """Terminate this event's instances whose launching process is gone or whose
        deadline tag has passed; with ``claims`` (the ledger's dispatchers, each with the
        submissions it runs now; read after the instances are listed), also those of a
        dispatcher the ledger knows that no running submission accounts for: a live
        dispatcher's leaks. A dispatcher the ledger does not know (a RAMP board's) is
        left to the other rules."""
        section = cls.settings_of(config)
        event = section.dispatch.event_name or ""
        now = time.time()
        running: dict[str, set[str]] | None = None

        def owned(tags: dict[str, str]) -> bool:
            nonlocal running
            deadline = ec2.parse_deadline(tags.get(ec2.TAG_DEADLINE))
            if not owner_alive(tags.get(ec2.TAG_OWNER)) or (
                    deadline is not None and deadline <= now):
                return False
            if claims is None:
                return True
            # Read once, after EC2 listed the instances: a submission is claimed before
            # its instance is launched, so every live run's claim is already there.
            running = claims() if running is None else running
            runs = running.get(tags.get(ec2.TAG_DISPATCHER, ""))
            if runs is None:
                return True
            # A reused instance's submission tag is its first run's: it is its
            # dispatcher's while that dispatcher runs anything (idle, its timer ends it).
            return tags.get(ec2.TAG_SUBMISSION, "") in runs or (
                ec2.TAG_REUSE in tags and bool(runs))

        orphans = ec2.reap(_client(section), event, owned, dry_run=dry_run)
        if orphans:
            logger.warning("%s %d leftover instance(s) of event %r: %s",
                           "would terminate" if dry_run else "terminated", len(orphans), event,
                           ", ".join(orphans))
        return orphans
