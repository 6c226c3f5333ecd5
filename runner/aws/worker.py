"""AWSWorker (``worker_type: aws``): one EC2 instance per submission, driven over SSH.

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

from runner.aws import cost, ec2
from runner.aws.settings import AWSWorkerSection
from runner.errors import InfrastructureError
from runner.ssh.remote_worker import RemoteWorker, check_private_key, known_hosts_path
from runner.ssh.session import RemoteSession, forget_host

logger = logging.getLogger("runner.worker")

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

    def setup(self) -> None:
        """Find the AMI, launch, wait for SSH, upload; terminate the instance on any failure."""
        section = self.settings
        self.remote_kit = section.remote_ramp_kit_folder.rstrip("/")
        self.conda_env, self.path_prefix = section.conda_env, section.remote_path_prefix
        self._ec2 = _client(section)
        if section.ami_image_id:
            image_id = ec2.pinned_ami(self._ec2, section.ami_image_id)
        else:
            image_id = ec2.newest_ami(self._ec2, section.ami_image_name)
        event = section.dispatch.event_name or ""
        lifetime = self.timeout + section.self_destruct_margin
        tags = {
            "Name": f"ramp-runner {event} {self.submission}",
            ec2.TAG_EVENT: event,
            ec2.TAG_SUBMISSION: self.submission,
            ec2.TAG_DISPATCHER: section.dispatch.dispatcher_id or "",
            ec2.TAG_OWNER: owner_token(),
            # Counted from before the launch: the self-destruct counts from the later boot.
            ec2.TAG_DEADLINE: ec2.deadline_tag(time.time() + lifetime),
        }
        if section.challenge_name:
            tags[ec2.TAG_CHALLENGE] = section.challenge_name
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
            self._upload()
        except BaseException:
            self._terminate()
            raise
        super().setup()

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
        price = None
        if instance.spot:
            price = cost.spot_price(self._ec2, instance.instance_id, instance.instance_type,
                                    instance.launched_at, ended_at)
        if price is None:  # on-demand, or a spot price EC2 did not give: the table's
            price = self.settings.price_per_hour(instance.instance_type)
        return cost.InstanceUsage(instance.instance_id, instance.instance_type,
                                  instance.market, instance.launched_at, ended_at, price)

    def release_run(self) -> None:
        """Terminate the instance, whatever happened before (after a failed collect too)."""
        self._terminate()

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
            return runs is None or tags.get(ec2.TAG_SUBMISSION, "") in runs

        orphans = ec2.reap(_client(section), event, owned, dry_run=dry_run)
        if orphans:
            logger.warning("%s %d leftover instance(s) of event %r: %s",
                           "would terminate" if dry_run else "terminated", len(orphans), event,
                           ", ".join(orphans))
        return orphans
