"""The supervisor's ceilings, with real attack programs against the real kernel.

Each run gets a cgroup (memory with shared memory counted, processes, CPU) and a disk of its
own (a tmpfs capped in size and inodes, in the supervisor's own mount namespace);
``runner.scratch.remove_tree`` removes what a run left. These tests need root, the cgroup
controllers, unshare(2) and mount(2): they fail, never skip, where those are missing. After
each test no mount is left under its folder and no run's cgroup is left on the host.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from runner import sandbox, scratch, supervise

MIB = 1024 * 1024
CONTROLLERS = ("memory", "pids", "cpu", "cpuset")


@dataclass
class Outcome:
    returncode: int
    log: str
    reason: dict | None
    peak_mib: float | None


def _groups_on_host() -> list[str]:
    return [f"{controller}/{name}" for controller in CONTROLLERS
            for name in os.listdir(f"/sys/fs/cgroup/{controller}")
            if name.startswith(supervise.GROUP_PREFIX)]


def _mounts_under(path: Path, table: str = "/proc/self/mounts") -> list[str]:
    """The mount points at or under ``path`` in a mount table (this process's by default)."""
    top = os.path.realpath(path)
    with open(table) as handle:
        points = [line.split()[1] for line in handle]
    return [p for p in points if p == top or p.startswith(top + "/")]


@pytest.fixture(autouse=True)
def leaves_nothing_behind(tmp_path):
    """Remove the scratch as the dispatcher will, then check nothing of the run is left
    (groups of supervisors that other modules' tests killed are reaped first)."""
    supervise.reap_stale_groups()
    yield
    assert scratch.remove_tree(tmp_path / "scratch")
    assert _mounts_under(tmp_path) == []
    assert _groups_on_host() == []


def _supervise(tmp_path: Path, *options: str, code: str, sandbox: bool = True,
               timeout: float = 60) -> Outcome:
    """Run ``python -c code`` under the supervisor with a copy to write and a private /tmp,
    as a worker does."""
    folder = tmp_path / "scratch"
    copy = folder / "submissions" / "attack"
    copy.mkdir(parents=True, exist_ok=True)
    (copy / "estimator.py").write_text("# the participant's source\n")
    files = {name: folder / name for name in ("log", "reason", "peak")}
    confined = ["--sandbox", "--rw", str(copy)] if sandbox else []
    with open(files["log"], "wb") as log:
        returncode = subprocess.run(
            [sys.executable, supervise.__file__, "--reason", str(files["reason"]),
             "--peak-rss", str(files["peak"]), "--tmp", str(folder / "tmp"), *confined,
             *options, "--", sys.executable, "-c", code],
            stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False,
            cwd=copy).returncode
    reason = files["reason"]
    return Outcome(returncode, files["log"].read_text(errors="replace"),
                   json.loads(reason.read_text()) if reason.exists() else None,
                   float(files["peak"].read_text()) if files["peak"].exists() else None)


def _stopped_for(outcome: Outcome, key: str, value: int) -> None:
    assert outcome.returncode != 0, outcome.log
    assert outcome.reason is not None, outcome.log
    assert outcome.reason["fault"] == "submission" and outcome.reason["limit"] == key
    assert outcome.reason["message"].endswith(f"more than {key}={value}")


def test_this_machine_gives_runs_cgroups_and_mounts():
    assert os.geteuid() == 0, "the ceilings are tested as root"
    for controller in CONTROLLERS:
        assert os.access(f"/sys/fs/cgroup/{controller}", os.W_OK), controller


def test_memory_touched_at_once_is_stopped_at_the_ceiling(tmp_path):
    code = ("import mmap\nm = mmap.mmap(-1, 3 << 30, flags=mmap.MAP_PRIVATE | "
            "mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)\nprint('TOUCHED 3 GB')")
    outcome = _supervise(tmp_path, "--memory-limit-mb", "300", code=code)
    _stopped_for(outcome, "memory_limit_mb", 300)
    assert "TOUCHED" not in outcome.log
    # The cgroup's own high-water mark: the ceiling holds, not a sample taken too late.
    assert outcome.peak_mib is not None and outcome.peak_mib <= 300 * 1.02


def test_memory_held_in_files_no_process_maps_is_charged(tmp_path):
    code = ("import os\nchunk = b'x' * (16 << 20)\nfds = [os.memfd_create(f'held{i}') "
            "for i in range(12)]\nfor fd in fds:\n for _ in range(6): os.write(fd, chunk)\n"
            "print('HELD 1.2 GB', flush=True)")
    outcome = _supervise(tmp_path, "--memory-limit-mb", "300", code=code)
    _stopped_for(outcome, "memory_limit_mb", 300)
    assert "HELD" not in outcome.log


def test_busy_processes_share_the_cores_they_were_given(tmp_path):
    # 8 processes spin for 2 s of wall time; the parent reports their CPU time per second.
    code = ("import os, time\nstart = time.monotonic()\nfor _ in range(8):\n"
            " if os.fork() == 0:\n  while time.monotonic() - start < 2: pass\n  os._exit(0)\n"
            "for _ in range(8): os.wait()\nt = os.times()\n"
            "print('CORES', (t.children_user + t.children_system) / (time.monotonic() - start),"
            " 'AFFINITY', len(os.sched_getaffinity(0)))")
    outcome = _supervise(tmp_path, "--cpus", "1", code=code)
    assert outcome.returncode == 0, outcome.log
    words = outcome.log.split()
    assert float(words[words.index("CORES") + 1]) < 1.3, outcome.log
    # This machine has 2 cores and no other run holds one: the run gets one of its own.
    assert words[words.index("AFFINITY") + 1] == "1", outcome.log


def test_preallocated_files_fill_the_runs_own_disk_not_the_hosts(tmp_path):
    code = ("import os, sys\nfor i in range(20):\n fd = os.open(f'big{i}', os.O_CREAT | "
            "os.O_WRONLY)\n try: os.posix_fallocate(fd, 0, 99 << 20)\n except OSError as e:\n"
            "  print('REFUSED', i, e.errno); sys.exit(1)\nprint('WROTE 1980 MB')")
    outcome = _supervise(tmp_path, "--output-limit-mb", "100", code=code)
    assert "REFUSED 1 28" in outcome.log  # ENOSPC at the second file: its own 100 MB disk
    _stopped_for(outcome, "output_limit_mb", 100)
    copy = tmp_path / "scratch" / "submissions" / "attack"
    # What reached the host's disk: what the run's disk held, no more.
    assert sum(p.stat().st_size for p in copy.iterdir()) <= 100 * MIB
    assert (copy / "estimator.py").read_text() == "# the participant's source\n"


def test_sparse_files_are_copied_out_within_the_output_limit(tmp_path):
    # Each under RLIMIT_FSIZE and next to nothing on the run's disk, 120 MB in all once read.
    code = ("import os\nfor i in range(3):\n with open(f'sparse{i}', 'wb') as handle:\n"
            "  handle.truncate(40 << 20)\nprint('SPARSE 120 MB')")
    outcome = _supervise(tmp_path, "--output-limit-mb", "50", code=code)
    assert "SPARSE 120 MB" in outcome.log
    _stopped_for(outcome, "output_limit_mb", 50)
    copy = tmp_path / "scratch" / "submissions" / "attack"
    assert sum(p.stat().st_size for p in copy.iterdir()) <= 50 * MIB


def test_the_runs_files_are_copied_out_at_its_end_and_no_link_is_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "kept").write_text("precious")
    copy = tmp_path / "scratch" / "submissions" / "attack"
    copy.mkdir(parents=True)
    (copy / "planted").symlink_to(victim)  # shipped with the submission
    code = ("import os\nos.unlink('planted'); os.mkdir('planted')\n"
            "open('planted/x', 'w').write('through the link?')\n"
            "os.makedirs('training_output/fold_0')\n"
            "open('training_output/fold_0/y_pred.npy', 'w').write('predictions')\n"
            f"os.symlink({str(victim / 'kept')!r}, 'training_output/kept')\n"
            "os.mkfifo('training_output/pipe')\n"
            "open('estimator.py', 'a').write('# changed by the run\\n')\nprint('WROTE')")
    outcome = _supervise(tmp_path, "--output-limit-mb", "50", code=code)
    assert (outcome.returncode, outcome.reason) == (0, None), outcome.log
    assert "WROTE" in outcome.log
    output = copy / "training_output"
    assert (output / "fold_0" / "y_pred.npy").read_text() == "predictions"
    assert os.readlink(output / "kept") == str(victim / "kept")  # a link, not its target
    assert stat.S_ISFIFO(os.lstat(output / "pipe").st_mode)
    assert (copy / "estimator.py").read_text().endswith("# changed by the run\n")
    # The planted link was replaced by the run's folder, never written through.
    assert not (copy / "planted").is_symlink()
    assert (copy / "planted" / "x").read_text() == "through the link?"
    assert sorted(os.listdir(victim)) == ["kept"]
    assert (victim / "kept").read_text() == "precious"


@pytest.mark.parametrize("sandboxed", [True, False], ids=["sandbox", "no-sandbox"])
def test_a_supervisor_killed_outright_leaves_no_mount(tmp_path, sandboxed):
    folder = tmp_path / "scratch"
    copy = folder / "submissions" / "attack"
    copy.mkdir(parents=True)
    code = ("import os, time\nopen('mine', 'w').write('on its disk')\n"
            "print('UP', os.getpid(), flush=True)\ntime.sleep(3600)")
    supervisor = subprocess.Popen(
        [sys.executable, supervise.__file__, "--tmp", str(folder / "tmp"), "--rw", str(copy),
         *(["--sandbox"] if sandboxed else []), "--output-limit-mb", "50", "--",
         sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=copy)
    run = None
    try:
        words = supervisor.stdout.readline().split()
        assert words[:1] == [b"UP"], words
        run = int(words[1])
        # The disk is there for the supervisor and its run, and nowhere else.
        assert sorted(_mounts_under(folder, f"/proc/{supervisor.pid}/mounts")) == sorted(
            [str(copy), str(folder / "tmp")])
        assert _mounts_under(tmp_path) == []
        assert not (copy / "mine").exists()
        supervisor.kill()
        supervisor.wait()
        if not sandboxed:
            # Its run lives on (until its starter kills it), holding the namespace: the
            # folder can be removed all the same.
            os.kill(run, 0)
        assert _mounts_under(tmp_path) == []
        assert scratch.remove_tree(folder)
        assert not folder.exists()
    finally:
        supervisor.kill()
        supervisor.wait()
        if not sandboxed and run is not None:
            _kill(run)


def test_a_flood_of_empty_files_is_refused_by_the_inode_cap(tmp_path):
    code = ("import os, sys\nfor i in range(300_000):\n try: os.close(os.open(f'f{i}', "
            "os.O_CREAT | os.O_WRONLY))\n except OSError as e:\n"
            "  print('REFUSED', i, e.errno); sys.exit(1)\nprint('CREATED 300000')")
    outcome = _supervise(tmp_path, "--output-limit-mb", "100", code=code)
    words = outcome.log.split()
    assert "REFUSED" in words, outcome.log
    assert int(words[words.index("REFUSED") + 1]) <= supervise.DISK_INODES
    assert words[words.index("REFUSED") + 2] == "28"
    _stopped_for(outcome, "output_limit_mb", 100)


def test_a_fork_flood_is_refused_and_named_even_if_the_run_carries_on(tmp_path):
    code = ("import os, time\nchildren = []\nwhile True:\n try: pid = os.fork()\n"
            " except OSError: break\n if pid == 0:\n  time.sleep(0.5); os._exit(0)\n"
            " children.append(pid)\nprint('REFUSED AFTER', len(children), flush=True)\n"
            "for pid in children: os.kill(pid, 9); os.waitpid(pid, 0)")
    outcome = _supervise(tmp_path, "--max-processes", "20", code=code)
    assert "REFUSED AFTER" in outcome.log
    _stopped_for(outcome, "max_processes", 20)


def test_an_event_under_tmp_keeps_a_private_writable_tmp(tmp_path):
    assert str(tmp_path).startswith("/tmp/")  # the kit's parents are mounted inside /tmp
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "problem.py").write_text("title = 'iris'\n")
    options = ["--ro", str(kit)]
    argv = supervise.bwrap_argv(supervise.parse([
        "--sandbox", "--tmp", str(tmp_path / "scratch" / "tmp"), *options, "--", "true"])[0],
        ["true"], 0)
    assert "--dir /tmp " not in " ".join(argv) + " "
    code = (f"import os\nos.makedirs('/tmp/cache'); open('/tmp/cache/x', 'w').write('tmp')\n"
            f"open('/dev/shm/y', 'w').write('shm')\nprint('READ', open({str(kit)!r} + "
            "'/problem.py').read().split()[-1], 'TMP', sorted(os.listdir('/tmp')))")
    outcome = _supervise(tmp_path, *options, code=code)
    assert outcome.returncode == 0, outcome.log
    assert "READ 'iris'" in outcome.log and "'cache'" in outcome.log


def test_a_plain_run_records_its_peak_and_leaves_no_group(tmp_path):
    code = "b = bytearray(50 << 20); print('OK')"
    outcome = _supervise(tmp_path, "--memory-limit-mb", "300", "--max-processes", "50",
                         "--cpus", "1", "--output-limit-mb", "100", code=code)
    assert (outcome.returncode, outcome.reason) == (0, None), outcome.log
    assert 50 <= outcome.peak_mib <= 300
    assert "supervise:" not in outcome.log  # nothing fell back


def test_without_rights_the_limits_fall_back_to_sampling_and_say_so_once():
    with tempfile.TemporaryDirectory() as folder:  # pytest's tmp_path is root's only
        os.chown(folder, 65534, 65534)
        completed = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
             supervise.__file__, "--tmp", f"{folder}/tmp", "--memory-limit-mb", "300",
             "--max-processes", "50", "--cpus", "1", "--output-limit-mb", "100", "--",
             "/usr/bin/python3", "-c", "print('RAN')"],
            capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == "RAN\n"
    said = completed.stderr.splitlines()
    assert len(said) == 1 and said[0].startswith("supervise: "), said
    assert "sampled" in said[0]


def test_a_group_left_by_a_killed_supervisor_is_reaped_by_the_next(tmp_path):
    marker, pid_file = tmp_path / "still-running", tmp_path / "pid"
    code = (f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
            f"while True:\n open({str(marker)!r}, 'w').close(); time.sleep(0.05)")
    supervisor = subprocess.Popen(
        [sys.executable, supervise.__file__, "--max-processes", "50", "--", sys.executable,
         "-c", code])
    try:
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        supervisor.kill()
        supervisor.wait()
        assert _groups_on_host() != []  # nobody removed it: its run still goes on
        outcome = _supervise(tmp_path, "--max-processes", "50", code="print('NEXT')")
        assert outcome.returncode == 0 and "NEXT" in outcome.log
        marker.unlink()
        time.sleep(0.3)
        assert not marker.exists()  # the orphaned run was killed with its group
    finally:
        _kill(int(pid_file.read_text()))


def test_sigterm_ends_the_run_and_removes_its_group():
    supervisor = subprocess.Popen(
        [sys.executable, supervise.__file__, "--memory-limit-mb", "300", "--",
         sys.executable, "-c", "import time; print('UP', flush=True); time.sleep(3600)"],
        stdout=subprocess.PIPE)
    try:
        assert supervisor.stdout.readline() == b"UP\n"
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(10) == 128 + signal.SIGTERM
    finally:
        supervisor.kill()
        supervisor.wait()


def test_the_cpu_count_reaches_the_supervisor():
    confinement = sandbox.Confinement(sandbox=True, network=False, read_only=(),
                                      writable=(), hidden=(), tmp="/scratch/tmp",
                                      limits=dict.fromkeys(sandbox.LIMITS, 1), cpus=2)
    options = confinement.options()
    assert options[options.index("--cpus") + 1] == "2"
    assert supervise.parse([*options, "--", "true"])[0]["--cpus"] == "2"


def test_a_deep_tree_is_removed_without_recursion(tmp_path):
    top = tmp_path / "scratch"
    top.mkdir()
    _deep_tree(top, 1200, "d")
    _deep_tree(top, 30, "x" * 200)  # 6,000 characters: longer than PATH_MAX
    locked = top / "locked"
    locked.mkdir()
    (locked / "inside").write_text("")
    locked.chmod(0)
    assert scratch.remove_tree(top)
    assert not top.exists()


def test_a_mount_point_in_a_scratch_is_not_entered(tmp_path, caplog):
    top = tmp_path / "other"
    (top / "mounted").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(top / "mounted")],
                   check=True)
    try:
        (top / "mounted" / "file").write_text("not the scratch's")
        assert scratch.remove_tree(top) is False
        assert (top / "mounted" / "file").read_text() == "not the scratch's"
        assert "'mounted' is a mount point" in caplog.text
    finally:
        subprocess.run(["umount", str(top / "mounted")], check=True)


def test_a_scratch_that_is_a_link_is_removed_not_followed(tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "ledger").write_text("precious")
    (tmp_path / "scratch").symlink_to(kept)
    assert scratch.remove_tree(tmp_path / "scratch")
    assert (kept / "ledger").read_text() == "precious"


def test_what_cannot_be_removed_is_said_in_one_line_and_left(tmp_path, caplog):
    top = tmp_path / "scratch"
    top.mkdir()
    _deep_tree(top, 50, "d")
    assert scratch.remove_tree(top, max_depth=20) is False
    assert top.exists()
    assert [r.getMessage().count("\n") for r in caplog.records] == [0]
    assert "deeper than 20 folders" in caplog.text


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _deep_tree(top: Path, depth: int, name: str) -> None:
    folder = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=folder)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=folder)
            os.close(folder)
            folder = child
        with open(os.open("leaf", os.O_CREAT | os.O_WRONLY, dir_fd=folder), "w") as leaf:
            leaf.write("leaf")
    finally:
        os.close(folder)
