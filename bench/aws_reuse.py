"""Makespan of an AWS event with and without ``reuse_instances``.

moto plays EC2 and a real sshd on 127.0.0.1 plays every instance (as in
tests/aws/test_aws_worker.py); real ramp-test runs in the real sandbox. A boot delay is
injected under this benchmark only: each RunInstances answer is held ``--boot-seconds``
(the launch-to-SSH time of a real instance, ~25-30 s measured publicly), by a handler on
the EC2 client the worker makes. Prints one table:

    python bench/aws_reuse.py [--submissions 20] [--slots 2] [--boot-seconds 20] [--max-runs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

from common import RESULTS, machine

from runner.aws import ec2
from runner.aws import worker as aws_worker
from runner.config import load_event_config
from runner.dispatcher import Dispatcher
from runner.ledger import Ledger
from tests.events import make_event
from tests.sshd import (
    AMI_BASE,
    REGION,
    add_ami,
    aws_worker_section,
    free_port,
    host_kit,
    running_sshd,
)

MAKE_CLIENT = aws_worker._client


def with_boot_delay(seconds: float, launches: list[float]):
    """The worker's client factory, its RunInstances answers held ``seconds`` each."""

    def slow_client(section):
        client = MAKE_CLIENT(section)

        def boot(**_):
            launches.append(time.time())
            time.sleep(seconds)

        client.meta.events.register("after-call.ec2.RunInstances", boot)
        return client

    return slow_client


def fresh_account(moto_url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST"))
    import boto3

    boto3.client("ec2", region_name=REGION).create_security_group(
        GroupName="ramp-workers", Description="ramp workers")
    add_ami(AMI_BASE + "-2024-01-01", "2024-01-01T00:00:00+00:00",
            tags={"ramp-runner:ami-base-name": AMI_BASE})


def one_event(folder: Path, sshd, kit: Path, moto_url: str, args, reuse: dict | None) -> dict:
    """Dispatch ``args.submissions`` copies of the starting kit; what it took."""
    fresh_account(moto_url)
    worker = aws_worker_section(sshd, kit, timeout=120)
    if reuse is not None:
        worker["reuse_instances"] = reuse
    path = make_event(folder, ("starting_kit",), worker=worker, dispatcher={
        "hunger_policy": "exit", "n_workers": args.slots, "n_threads": 1,
        "time_between_collection": 0.5})
    submissions = folder / "submissions"
    for index in range(args.submissions):
        shutil.copytree(submissions / "starting_kit", submissions / f"sub-{index:02d}")
    shutil.rmtree(submissions / "starting_kit")
    config = load_event_config(path)
    launches: list[float] = []
    aws_worker._client = with_boot_delay(args.boot_seconds, launches)
    started = time.time()
    Dispatcher(config).run()
    makespan = time.time() - started
    with Ledger(config.ledger_path) as ledger:
        rows = ledger.all()
    states = {row.state for row in rows}
    if states != {"scored"}:
        raise RuntimeError(f"not every submission was scored: {states}")
    import boto3

    live = [i for r in boto3.client("ec2", region_name=REGION).describe_instances(Filters=[
        {"Name": "instance-state-name", "Values": list(ec2.LIVE_STATES)}])["Reservations"]
        for i in r["Instances"]]
    return {"reuse": reuse, "makespan_s": round(makespan, 1), "launches": len(launches),
            "instance_s": round(sum(row.instance_seconds or 0 for row in rows), 1),
            "left_running": len(live)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submissions", type=int, default=20)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--boot-seconds", type=float, default=20.0)
    parser.add_argument("--max-runs", type=int, default=10)
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    moto_url = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ENDPOINT_URL_EC2": moto_url, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_SHARED_CREDENTIALS_FILE": os.devnull})
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        os.environ.pop(name, None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-aws-reuse-") as scratch:
        scratch = Path(scratch)
        with running_sshd(Path(tempfile.mkdtemp(dir=scratch))) as sshd:
            # Every instance answers at the local sshd (as tests/real_parts.py has it).
            ec2.instance_address = lambda client, instance_id: (sshd.host, sshd.port)
            kit = host_kit(scratch / "remote")
            for reuse in (None, {"max_runs": args.max_runs, "idle_minutes": 1}):
                name = "off" if reuse is None else "on"
                rows.append(one_event(scratch / f"event-{name}", sshd, kit, moto_url, args,
                                      reuse))
    server.stop()

    print(f"\n{args.submissions} submissions (iris starting_kit), {args.slots} slots, "
          f"{args.boot_seconds:g} s injected boot")
    print(f"{'reuse_instances':<30}{'makespan s':>12}{'launches':>10}{'instance s':>12}"
          f"{'left running':>14}")
    for row in rows:
        reuse = ("off" if row["reuse"] is None else
                 f"max_runs {row['reuse']['max_runs']}, idle 1 min")
        print(f"{reuse:<30}{row['makespan_s']:>12.1f}{row['launches']:>10}"
              f"{row['instance_s']:>12.1f}{row['left_running']:>14}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "aws_reuse.json").write_text(json.dumps(
        {"machine": machine(), "args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
