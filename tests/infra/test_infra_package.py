"""infra/ as a package: tests import it directly, Pulumi runs it from inside, tags match the runner.

infra/ never imports runner/ (they meet through stack outputs), so the tag keys the two
share are checked here, where both are importable.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import infra
from infra import tags
from runner.aws import ec2

INFRA_DIR = Path(infra.__file__).resolve().parent

# What Pulumi's Python language host does (pulumi-language-python-exec): chdir into the
# project directory and runpy.run_path(".", run_name="__main__"), so only infra/ itself is
# on sys.path. Mocks stand in for the engine; the config is the smallest valid one.
RUN_LIKE_PULUMI = """
import json, runpy, sys
import pulumi

class Mocks(pulumi.runtime.Mocks):
    def new_resource(self, args):
        types.append(args.typ)
        return [args.name + "-id", dict(args.inputs, arn="arn:aws:mock:" + args.name)]

    def call(self, args):
        return {"value": "ami-0123", "id": "ami-0123", "rootDeviceName": "/dev/sda1"}

types = []
sys.path = [p for p in sys.path if p not in ("", sys.argv[1])]
pulumi.runtime.set_mocks(Mocks(), project="ramp-runner", stack="t", preview=False)
pulumi.runtime.set_all_config(json.loads(sys.argv[2]))

@pulumi.runtime.test
def run():
    runpy.run_path(".", run_name="__main__")

run()
print(json.dumps({"package": "infra.program" in sys.modules, "types": types}))
"""


def test_pulumi_runs_the_program_from_inside_infra():
    config = {
        "aws:region": "eu-west-1",
        "ramp-runner:challengeName": "iris",
        "ramp-runner:sshCidrs": '["203.0.113.7/32"]',
        "ramp-runner:publicKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHk5bGV4 organiser@ramp",
    }
    result = subprocess.run(
        [sys.executable, "-c", RUN_LIKE_PULUMI, str(INFRA_DIR.parent), json.dumps(config)],
        cwd=INFRA_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["package"], "the program must be imported as the infra package"
    assert "aws:imagebuilder/imagePipeline:ImagePipeline" in report["types"]


def test_infra_never_imports_runner():
    for path in INFRA_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "runner" for n in names), path.name


def test_infra_tags_use_the_runner_prefix():
    prefix = ec2.TAG_EVENT.split(":")[0] + ":"
    assert tags.TAG_PREFIX == prefix
    assert tags.TAG_CHALLENGE.startswith(prefix)
    assert tags.TAG_AMI_BASE_NAME.startswith(prefix)


def test_event_tag_is_the_key_the_runner_writes():
    # The dispatcher policy requires it on every launch.
    assert tags.TAG_EVENT == ec2.TAG_EVENT


def test_ami_base_name_tag_is_the_key_the_runner_reads():
    # The runner finds the newest AMI of an event by this tag (issue 12); its constant
    # must carry the same literal.
    assert tags.TAG_AMI_BASE_NAME == "ramp-runner:ami-base-name"


def test_the_aws_worker_touches_the_heartbeat_the_ami_watches():
    from infra.worker_contract import HEARTBEAT_FILE
    from runner.aws.worker import AWSWorker

    assert AWSWorker.heartbeat_file == HEARTBEAT_FILE
    worker = AWSWorker.__new__(AWSWorker)  # the script needs no instance state
    assert worker._beating("echo running") == f"touch {HEARTBEAT_FILE} 2>/dev/null; echo running"
