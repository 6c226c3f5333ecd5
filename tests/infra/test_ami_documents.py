"""The AWSTOE component documents of ami/: structure, parameters, shellcheck on every script."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

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
    assert set(DOCUMENTS) == {"ramp-worker", "gpu-drivers"}


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
