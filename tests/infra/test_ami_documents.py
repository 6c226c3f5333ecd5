"""The AWSTOE component documents of ami/: structure, parameters, shellcheck on every script."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from infra import ami_documents
from infra.versions import content_version

DOCUMENTS = ami_documents.load_documents()
BLOCKS = [
    pytest.param(document, block, id=f"{stem}:{block.phase}:{block.step}")
    for stem, document in DOCUMENTS.items()
    for block in document.bash_blocks()
]
KNOWN_ACTIONS = {"ExecuteBash", "Reboot", "S3Download", "S3Upload", "WebDownload", "UpdateOS"}
IDENTIFIER = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def test_the_documents_are_there():
    assert set(DOCUMENTS) == {"ramp-worker", "gpu-drivers", "worker-guard"}


@pytest.mark.parametrize("document", DOCUMENTS.values(), ids=list(DOCUMENTS))
def test_document_structure(document):
    content = document.content
    assert set(content) <= {"name", "description", "schemaVersion", "parameters", "phases"}
    assert content["name"] == document.path.stem
    assert content["description"]
    assert str(content["schemaVersion"]) == "1.0"
    # Image Builder takes at most 16000 characters of inline component data.
    assert len(document.text) <= 16000
    phases = [phase["name"] for phase in content["phases"]]
    assert phases == ["build", "test"]
    for phase in content["phases"]:
        assert set(phase) == {"name", "steps"}
        names = [step["name"] for step in phase["steps"]]
        assert names and len(names) == len(set(names)), names
        for step in phase["steps"]:
            assert IDENTIFIER.match(step["name"]), step["name"]
            assert set(step) <= {
                "name",
                "action",
                "inputs",
                "timeoutSeconds",
                "onFailure",
                "maxAttempts",
            }
            assert step["action"] in KNOWN_ACTIONS
            assert isinstance(step.get("timeoutSeconds", 1), int)
            assert step.get("onFailure", "Abort") in {"Abort", "Continue", "Ignore"}
            if step["action"] == "ExecuteBash":
                commands = step["inputs"]["commands"]
                assert commands and all(isinstance(c, str) for c in commands)


@pytest.mark.parametrize("document", DOCUMENTS.values(), ids=list(DOCUMENTS))
def test_parameters_declared_and_used(document):
    declared = document.parameters
    assert declared, "values come in as AWSTOE parameters"
    for name, spec in declared.items():
        assert IDENTIFIER.match(name), name
        assert spec["type"] == "string"
        assert spec.get("description")
        if "default" in spec:
            assert spec["default"] != "", "AWSTOE rejects empty parameter values"
    assert document.referenced_parameters() == set(declared)


@pytest.mark.parametrize("document", DOCUMENTS.values(), ids=list(DOCUMENTS))
def test_parameters_are_quoted_shell_assignments(document):
    for block in document.bash_blocks():
        for line in block.script.splitlines():
            if ami_documents.PARAMETER_REFERENCE.search(line):
                assert re.fullmatch(r'\s*[a-z0-9_]+="\{\{ [A-Za-z0-9]+ \}\}"', line), line


@pytest.mark.parametrize(("document", "block"), BLOCKS)
def test_shellcheck(document, block):
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is required: apt-get install -y shellcheck"
    # shellcheck cannot parse {{ Name }}: give each parameter a placeholder value.
    script = ami_documents.PARAMETER_REFERENCE.sub(
        lambda match: f"PARAMETER_{match.group(1)}", block.script
    )
    assert script.lstrip().startswith("set -euo pipefail")
    result = subprocess.run(
        [shellcheck, "--shell=bash", "--severity=style", "-"],
        input=f"#!/bin/bash\n{script}\n",
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_worker_reads_osf_credentials_from_ssm_at_build_time():
    worker = DOCUMENTS["ramp-worker"]
    [fetch] = [b for b in worker.bash_blocks() if b.step == "FetchData"]
    assert "aws ssm get-parameter" in fetch.script
    assert "--with-decryption" in fetch.script
    assert "constants" not in worker.content
    assert not re.search(r"password\s*[:=]\s*[^\"$\s]", worker.text, re.IGNORECASE)


def test_worker_test_phase_runs_the_starting_kit_as_the_instance_user():
    worker = DOCUMENTS["ramp-worker"]
    tests = [b for b in worker.bash_blocks() if b.phase == "test"]
    script = "\n".join(b.script for b in tests)
    assert "ramp-test --submission starting_kit --quick-test" in script
    assert 'sudo -u "$user"' in script


def test_worker_environment_sources():
    [create] = [b for b in DOCUMENTS["ramp-worker"].bash_blocks() if b.step == "CreateEnvironment"]
    for name in ("environment.yml", "requirements.txt", "extra_libraries.txt"):
        assert name in create.script


def test_content_version_follows_every_edit():
    text = DOCUMENTS["ramp-worker"].text
    version = content_version(text)
    assert re.fullmatch(r"1\.\d+\.\d+", version)
    assert content_version(text) == version
    edited = text.replace("clean --all --yes", "clean --all --quiet --yes", 1)
    assert content_version(edited) != version
    assert DOCUMENTS["ramp-worker"].version == version


def run_block(block, parameters, fakes, tmp_path):
    """Run one ExecuteBash script with its parameters filled in and some commands faked.

    Each fake is a shell body; every call of a faked command is logged as a line of argv.
    """
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir(exist_ok=True)
    for name, body in fakes.items():
        fake = bin_dir / name
        fake.write_text(f'#!/bin/bash\necho "{name} $*" >> "{log}"\n{body}\n')
        fake.chmod(0o755)
    script = ami_documents.PARAMETER_REFERENCE.sub(lambda m: parameters[m.group(1)], block.script)
    result = subprocess.run(
        ["bash", "-c", script],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    calls = log.read_text().splitlines() if log.exists() else []
    return result, calls


def gpu_block(phase, step):
    [block] = [
        b for b in DOCUMENTS["gpu-drivers"].bash_blocks() if (b.phase, b.step) == (phase, step)
    ]
    return block


def test_gpu_drivers_install_prebuilt_signed_modules_for_the_running_kernel(tmp_path):
    # nvidia-headless-<v> builds its module with DKMS, which gets no kernel headers under
    # --no-install-recommends: Ubuntu's linux-restricted-modules ship the module prebuilt
    # and signed for each kernel flavour (linux-modules-nvidia-<v>-<flavour>).
    result, calls = run_block(
        gpu_block("build", "InstallNvidiaDrivers"),
        {"DriverVersion": "535-server"},
        {"cloud-init": "exit 0", "apt-get": "exit 0", "uname": "echo 6.8.0-1021-aws"},
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    [install] = [c.split() for c in calls if c.startswith("apt-get") and " install " in c]
    packages = [arg for arg in install if not arg.startswith("-") and "=" not in arg]
    assert "linux-modules-nvidia-535-server-aws" in packages
    assert "nvidia-headless-no-dkms-535-server" in packages
    assert "nvidia-utils-535-server" in packages
    assert not any(p.startswith(("nvidia-headless-535", "nvidia-dkms")) for p in packages)


@pytest.mark.parametrize(
    ("module", "passes"),
    [("exit 0", True), ("echo 'modinfo: ERROR: Module nvidia not found.' >&2; exit 1", False)],
    ids=["module-present", "module-missing"],
)
def test_gpu_test_phase_needs_the_kernel_module_even_without_a_gpu(tmp_path, module, passes):
    # The build and test instances may be CPU types: without a module check a broken GPU
    # AMI passes its test phase.
    result, calls = run_block(
        gpu_block("test", "CheckNvidiaDrivers"),
        {"DriverVersion": "535-server"},
        {"dpkg-query": "exit 0", "modinfo": module, "nvidia-smi": "exit 0"},
        tmp_path,
    )
    assert (result.returncode == 0) is passes, result.stdout + result.stderr
    assert any(c.split()[:1] == ["modinfo"] and "nvidia" in c.split()[1:] for c in calls)


def test_osf_credentials_reach_download_data_but_no_command_line(tmp_path):
    # A command line is readable by every process on the instance (/proc/<pid>/cmdline);
    # the kit's download_data.py still gets its --username/--password inside Python.
    home = tmp_path / "home"
    kit = home / "ramp-kits" / "iris"
    kit.mkdir(parents=True)
    seen = tmp_path / "download-argv"
    (kit / "download_data.py").write_text(
        f"import json, sys\nopen({str(seen)!r}, 'w').write(json.dumps(sys.argv))\n"
    )
    (home / "miniforge3" / "bin").mkdir(parents=True)
    (home / "miniforge3" / "bin" / "python").symlink_to(sys.executable)
    values = {
        "/ramp-runner/iris/osf-username": "user-4b1d",
        "/ramp-runner/iris/osf-password": "pa55-9f2e",
    }
    aws = "\n".join(
        f'if [[ " $* " == *" {name} "* ]]; then echo {value}; fi' for name, value in values.items()
    )
    [fetch] = [b for b in DOCUMENTS["ramp-worker"].bash_blocks() if b.step == "FetchData"]
    result, calls = run_block(
        fetch,
        {
            "InstanceUser": "ubuntu",
            "ChallengeName": "iris",
            "DataSource": "osf",
            "DataS3Uri": "none",
            "OsfUsernameParameter": "/ramp-runner/iris/osf-username",
            "OsfPasswordParameter": "/ramp-runner/iris/osf-password",
            "AwsRegion": "eu-west-1",
        },
        {
            "aws": aws,
            "getent": f"echo 'ubuntu:x:1000:1000::{home}:/bin/bash'",
            "sudo": 'shift 3; exec "$@"',
        },
        tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(seen.read_text())[1:] == [
        "--private",
        "--username",
        "user-4b1d",
        "--password",
        "pa55-9f2e",
    ]
    for call in calls:
        assert "pa55-9f2e" not in call and "user-4b1d" not in call, call


def test_prepare_system_installs_bubblewrap_for_the_sandbox(tmp_path):
    [prepare] = [b for b in DOCUMENTS["ramp-worker"].bash_blocks() if b.step == "PrepareSystem"]
    result, calls = run_block(
        prepare,
        {"InstanceUser": "ubuntu"},
        {"cloud-init": "exit 0", "apt-get": "exit 0", "id": "exit 0"},
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    [install] = [c.split() for c in calls if c.startswith("apt-get") and " install " in c]
    assert "bubblewrap" in install


def test_conda_is_activated_by_login_shells_only(tmp_path):
    # The run starts with `bash -lc` (a login shell: ~/.profile); a poll is a plain SSH
    # command, whose bash reads ~/.bashrc only: it must start no conda (a Python process).
    home = tmp_path / "home"
    profile_d = home / "miniforge3" / "etc" / "profile.d"
    profile_d.mkdir(parents=True)
    (home / "ramp-kits").mkdir()
    activations = tmp_path / "activations"
    (profile_d / "conda.sh").write_text(f'conda() {{ echo "conda $*" >> "{activations}"; }}\n')
    # Ubuntu's skeleton: ~/.bashrc returns at once when not interactive.
    (home / ".bashrc").write_text("case $- in *i*) ;; *) return;; esac\n")
    (home / ".profile").write_text('[ -f "$HOME/.bashrc" ] && . "$HOME/.bashrc"\n')
    [configure] = [b for b in DOCUMENTS["ramp-worker"].bash_blocks()
                   if b.step == "ConfigureShell"]
    result, _ = run_block(
        configure,
        {"InstanceUser": "ubuntu"},
        {
            "getent": f"echo 'ubuntu:x:1000:1000::{home}:/bin/bash'",
            "id": "echo ubuntu",
            "chown": "exit 0",
            "install": 'cp "${@: -2:1}" "${@: -1}"',  # without -o/-g: tests need no root
        },
        tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    def shell(*argv, **env):
        run = subprocess.run(argv, env={"PATH": "/usr/bin:/bin", "HOME": str(home), **env},
                             capture_output=True, text=True, check=False, timeout=60)
        assert run.returncode == 0, run.stderr
        text = activations.read_text() if activations.exists() else ""
        activations.unlink(missing_ok=True)
        return text

    # What sshd runs for a poll: bash -c, reading ~/.bashrc (BASH_ENV stands for sshd here).
    assert shell("bash", "-c", "echo running", BASH_ENV=str(home / ".bashrc")) == ""
    assert shell("bash", "-lc", "true") == "conda activate base\n"
    # Run twice (a rebuilt image): one activation, not two.
    run_block(configure, {"InstanceUser": "ubuntu"}, {
        "getent": f"echo 'ubuntu:x:1000:1000::{home}:/bin/bash'", "id": "echo ubuntu",
        "chown": "exit 0", "install": 'cp "${@: -2:1}" "${@: -1}"'}, tmp_path)
    assert shell("bash", "-lc", "true") == "conda activate base\n"


def test_test_phase_checks_conda_in_login_shells():
    tests = "\n".join(b.script for b in DOCUMENTS["ramp-worker"].bash_blocks()
                      if b.phase == "test")
    assert "bash -lc 'conda info && command -v ramp-test'" in tests
    assert "bash -lc 'ramp-test --submission starting_kit --quick-test'" in tests


GUARD_PARAMETERS = {
    "InstanceUser": "ubuntu",
    "RunUser": "ramp-run",
    "HeartbeatFile": "/run/ramp-runner/heartbeat",
    "HeartbeatTimeout": "600",
}
HEREDOC = re.compile(r"<<'?([A-Z]+)'?\n(.*?)\n\1\n", re.DOTALL)


def guard_block(phase, step):
    [block] = [
        b for b in DOCUMENTS["worker-guard"].bash_blocks() if (b.phase, b.step) == (phase, step)
    ]
    return block


@pytest.fixture
def installed_guard(tmp_path):
    """InstallHeartbeatHalt run for real, with the system folders it writes bound to temp
    folders by bubblewrap (and a fake systemctl): the files it leaves, by system path."""
    bwrap = shutil.which("bwrap")
    assert bwrap, "bubblewrap is required: apt-get install -y bubblewrap"
    folders = {
        "/usr/local/sbin": tmp_path / "sbin",
        "/etc/systemd/system": tmp_path / "systemd",
        "/etc/tmpfiles.d": tmp_path / "tmpfiles.d",
    }
    binds = []
    for system_path, folder in folders.items():
        folder.mkdir()
        binds += ["--bind", str(folder), system_path]
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(f'#!/bin/bash\necho "systemctl $*" >> "{log}"\n')
    (bin_dir / "systemctl").chmod(0o755)
    block = guard_block("build", "InstallHeartbeatHalt")
    script = ami_documents.PARAMETER_REFERENCE.sub(
        lambda m: GUARD_PARAMETERS[m.group(1)], block.script
    )
    namespace = [bwrap, "--bind", "/", "/", "--dev", "/dev", "--proc", "/proc", *binds]
    result = subprocess.run(
        [*namespace, "bash", "-c", script],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    files = {
        f"{system_path}/{path.name}": path
        for system_path, folder in folders.items()
        for path in folder.iterdir()
    }
    return files, log.read_text().splitlines(), namespace


def test_heartbeat_timer_is_installed_enabled_and_valid(installed_guard):
    files, calls, namespace = installed_guard
    service = files["/etc/systemd/system/ramp-runner-heartbeat.service"].read_text()
    timer = files["/etc/systemd/system/ramp-runner-heartbeat.timer"].read_text()
    assert (
        "ExecStart=/usr/local/sbin/ramp-runner-heartbeat-check /run/ramp-runner/heartbeat 600"
        in service.splitlines()
    )
    assert "OnUnitActiveSec=1min" in timer.splitlines()
    assert "WantedBy=timers.target" in timer.splitlines()
    assert calls == ["systemctl enable ramp-runner-heartbeat.timer"], "enabled, not started"
    # systemd's own checker, where the units and their ExecStart are at their real paths.
    verify = subprocess.run(
        [*namespace, "systemd-analyze", "verify", "--man=no",
         "/etc/systemd/system/ramp-runner-heartbeat.timer",
         "/etc/systemd/system/ramp-runner-heartbeat.service"],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "ramp-runner-heartbeat" not in verify.stdout + verify.stderr
    tmpfiles = files["/etc/tmpfiles.d/ramp-runner-heartbeat.conf"].read_text().splitlines()
    assert tmpfiles == [
        "d /run/ramp-runner 0755 root root -",
        "f /run/ramp-runner/heartbeat 0644 ubuntu - -",
    ]


def test_heartbeat_check_script_passes_shellcheck(installed_guard):
    files, _, _ = installed_guard
    check = files["/usr/local/sbin/ramp-runner-heartbeat-check"]
    assert check.stat().st_mode & 0o777 == 0o755
    result = subprocess.run(
        ["shellcheck", "--severity=style", str(check)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("heartbeat_age", "timeout", "halts"),
    [
        (0, 600, False),  # the dispatcher polled just now
        (9 * 60, 600, False),
        (11 * 60, 600, True),  # the dispatcher is gone
        (None, 1, True),  # never a heartbeat, and the machine booted more than 1 s ago
        (None, 10**9, False),
    ],
    ids=["fresh", "nine-minutes", "eleven-minutes", "none-after-boot", "none-yet"],
)
def test_heartbeat_check_halts_only_without_a_recent_heartbeat(
    installed_guard, tmp_path, heartbeat_age, timeout, halts
):
    files, _, _ = installed_guard
    check = files["/usr/local/sbin/ramp-runner-heartbeat-check"]
    heartbeat = tmp_path / "run" / "heartbeat"
    heartbeat.parent.mkdir()
    if heartbeat_age is not None:
        heartbeat.touch()
        then = time.time() - heartbeat_age
        os.utime(heartbeat, (then, then))
    fake_bin, halted = tmp_path / "fake-bin", tmp_path / "halted"
    fake_bin.mkdir()
    (fake_bin / "shutdown").write_text(f'#!/bin/bash\necho "shutdown $*" >> "{halted}"\n')
    (fake_bin / "shutdown").chmod(0o755)
    result = subprocess.run(
        [str(check), str(heartbeat), str(timeout)],
        env={"PATH": f"{fake_bin}:/usr/bin:/bin"},
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    calls = halted.read_text().splitlines() if halted.exists() else []
    if halts:
        [call] = calls
        assert call.startswith("shutdown -h now "), call
    else:
        assert calls == []


def test_only_the_instance_user_can_touch_the_heartbeat(installed_guard):
    """The tmpfiles lines applied to a temp folder (uid 1000 standing for the instance user,
    65534 for the run's user): the owner refreshes the file, another user cannot, and
    cannot replace it either."""
    files, _, _ = installed_guard
    # Outside pytest's own folder, which only root may enter.
    with tempfile.TemporaryDirectory() as parent:
        Path(parent).chmod(0o755)
        check_heartbeat_permissions(files, Path(parent) / "run-ramp-runner")


def check_heartbeat_permissions(files, folder):
    """Create the folder and file as tmpfiles would, and touch the file as two users."""
    heartbeat = folder / "heartbeat"
    modes = {}
    for line in files["/etc/tmpfiles.d/ramp-runner-heartbeat.conf"].read_text().splitlines():
        kind, path, mode, owner, *_ = line.split()
        modes[kind] = (int(mode, 8), owner)
    folder.mkdir()
    folder.chmod(modes["d"][0])
    heartbeat.touch()
    heartbeat.chmod(modes["f"][0])
    assert modes["f"][1] == "ubuntu" and modes["d"][1] == "root"
    os.chown(heartbeat, 1000, 1000)

    def touch_as(uid: int, *argv: str) -> int:
        return subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv],
            capture_output=True, check=False, timeout=30,
        ).returncode

    assert touch_as(1000, "touch", str(heartbeat)) == 0
    assert touch_as(65534, "touch", str(heartbeat)) != 0
    assert touch_as(65534, "rm", "-f", str(heartbeat)) != 0
    assert touch_as(65534, "touch", str(folder / "other")) != 0


def test_run_user_gets_conda_in_login_shells_and_no_group(tmp_path):
    home = tmp_path / "ramp-run"
    home.mkdir()
    fakes = {
        "id": "exit 1",  # the user does not exist yet
        "useradd": "exit 0",
        "getent": f"echo 'ramp-run:x:1001:1001::{home}:/bin/bash'",
        "chown": "exit 0",
    }
    block = guard_block("build", "CreateRunUser")
    for _ in range(2):  # a rebuilt image: one activation line, not two
        result, calls = run_block(block, GUARD_PARAMETERS, fakes, tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
    [useradd] = [c.split() for c in calls if c.startswith("useradd")][:1]
    assert useradd[-1] == "ramp-run"
    assert not any(arg.startswith(("-G", "--groups", "-g", "--gid")) for arg in useradd)
    profile = (home / ".profile").read_text().splitlines()
    assert profile.count(". ~ubuntu/miniforge3/etc/profile.d/conda.sh && conda activate base") == 1


def test_guard_test_phase_disarms_the_timer_first_and_checks_the_run_user():
    steps = [b.step for b in DOCUMENTS["worker-guard"].bash_blocks() if b.phase == "test"]
    assert steps[0] == "HeartbeatHaltArmed"
    armed = guard_block("test", "HeartbeatHaltArmed").script
    assert armed.index("systemctl is-active") < armed.index("heartbeat-halt.disabled")
    installed = guard_block("build", "InstallHeartbeatHalt").script
    assert "ConditionPathExists=!/etc/ramp-runner/heartbeat-halt.disabled" in installed
    no_root = guard_block("test", "RunUserHasNoRoot").script
    assert 'sudo -l -U "$run_user"' in no_root
