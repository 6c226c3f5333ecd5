"""Benchmark (not a test): what one remote submission costs, and transfer throughput.

Starts its own sshd on 127.0.0.1 (needs openssh-server), then prints two tables:

1. one SSHWorker run of the iris starting_kit: SSH connections, round trips, bytes sent
   and received (payload of commands and tar streams);
2. upload/download throughput of runner.ssh.session (one gzip tar stream over paramiko)
   against ``tar -czf - | ssh host tar -xzf -`` (OpenSSH client) on the same loopback.

    python bench/remote_transfer.py [--size-mib 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runner.config import load_event_config  # noqa: E402
from runner.ssh.session import RemoteSession  # noqa: E402
from runner.ssh.worker import SSHWorker  # noqa: E402

IRIS = REPO / "examples" / "iris"


def start_sshd(folder: Path) -> tuple[subprocess.Popen, int, str]:
    """Start sshd on a free loopback port; return (process, port, user key path)."""
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(folder / name)], check=True)
    shutil.copyfile(folder / "user_key.pub", folder / "authorized_keys")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-f", "/dev/null", "-p", str(port),
         "-o", "ListenAddress=127.0.0.1", "-o", f"HostKey={folder / 'host_key'}",
         "-o", f"AuthorizedKeysFile={folder / 'authorized_keys'}", "-o", "PidFile=none",
         "-o", "StrictModes=no", "-o", "UsePAM=no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    host_key = (folder / "host_key.pub").read_text().split()[:2]
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")
    return process, port, str(folder / "user_key")


def one_submission(folder: Path, port: int, key: str) -> dict[str, float]:
    """Run the starting kit through an SSHWorker; return its session's counters."""
    kit = folder / "remote-kit"
    shutil.copytree(IRIS / "ramp-kits" / "iris", kit,
                    ignore=shutil.ignore_patterns("__pycache__", "submissions"))
    shutil.copy(IRIS / "ramp-data" / "iris" / "prepare_data.py", folder)
    subprocess.run([sys.executable, "prepare_data.py"], cwd=folder, check=True)
    shutil.move(folder / "data", kit / "data")
    event = folder / "event"
    shutil.copytree(IRIS / "submissions" / "starting_kit", event / "submissions" / "starting_kit",
                    ignore=shutil.ignore_patterns("training_output", "__pycache__"))
    (event / "config.yml").write_text(
        "ramp: {problem_name: iris, event_name: bench}\n"
        # The dispatcher's side checks the scores against this copy of the kit and data.
        f"worker:\n  worker_type: ssh\n  kit_dir: {kit}\n  data_dir: {kit}\n"
        "  submissions_dir: submissions\n"
        "  predictions_dir: predictions\n  logs_dir: logs\n"
        f"  remote_path_prefix: {Path(sys.executable).parent}\n  memory_profiling: true\n"
        f"  hosts: [{{host: 127.0.0.1, port: {port}, user: {getpass.getuser()}, "
        f"key_path: {key}, remote_ramp_kit_folder: {kit}}}]\n"
        "dispatcher: {time_between_collection: 1, n_threads: 1}\n")
    # With the live log the dispatcher keeps (runner.livelog): each poll brings its new bytes.
    worker = SSHWorker(load_event_config(event / "config.yml").worker_dict(
        live_log_dir=str(folder / "live")), "starting_kit")
    started = time.monotonic()
    worker.setup()
    worker.launch_submission()
    while worker.status == "running":
        worker.wait(60)
    worker.collect_results()
    session = worker.session
    counters = {"connections": session.connections, "round trips": session.round_trips,
                "bytes sent": session.bytes_sent, "bytes received": session.bytes_received}
    worker.teardown()
    polls = counters["round trips"] - 3  # upload, start, collect
    counters["polls (1 s apart)"] = polls
    counters["wall seconds"] = round(time.monotonic() - started, 1)
    return counters


def make_payload(folder: Path, size_mib: int) -> Path:
    """Half incompressible bytes, half CSV-like text, in 16 files."""
    payload = folder / "payload"
    payload.mkdir()
    chunk = size_mib * (1 << 20) // 16
    line = b"5.1,3.5,1.4,0.2,setosa\n"
    for i in range(8):
        (payload / f"random_{i}.bin").write_bytes(os.urandom(chunk))
        (payload / f"table_{i}.csv").write_bytes(line * (chunk // len(line)))
    return payload


def timed(function, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def throughput(folder: Path, port: int, key: str, size_mib: int, repeat: int):
    payload = make_payload(folder, size_mib)
    files = [(payload, "payload")] + [(p, f"payload/{p.name}") for p in sorted(payload.iterdir())]
    ssh = ["ssh", "-p", str(port), "-i", key, "-o", f"UserKnownHostsFile={folder/'known_hosts'}",
           "-o", "BatchMode=yes", f"{getpass.getuser()}@127.0.0.1"]
    up, down = folder / "up", folder / "down"

    def clean():
        for target in (up, down):
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()

    session = RemoteSession("127.0.0.1", getpass.getuser(), key, port,
                            known_hosts=folder / "known_hosts", strict_host_keys=True)
    session.connect()
    rows = []

    def ours_up():
        session.upload(files, str(up))

    def ours_down():
        session.download(str(up), "set -- payload", down)

    def tar_up():
        subprocess.run(f"tar -czf - -C {payload.parent} payload | "
                       f"{' '.join(ssh)} 'tar -xzf - -C {up}'", shell=True, check=True)

    def tar_down():
        subprocess.run(f"{' '.join(ssh)} 'tar -czf - -C {up} payload' | tar -xzf - -C {down}",
                       shell=True, check=True)

    for name, up_fn, down_fn in (("runner.ssh.session (paramiko, 1 connection)", ours_up,
                                  ours_down),
                                 ("tar | ssh (OpenSSH, 1 connection each)", tar_up, tar_down)):
        clean()
        t_up = timed(lambda: (clean(), up_fn()), repeat)  # noqa: B023 - called at once
        t_down = timed(lambda: (shutil.rmtree(down), down.mkdir(), down_fn()), repeat)  # noqa: B023
        rows.append((name, size_mib / t_up, size_mib / t_down, t_up, t_down))
    session.close()
    return rows, session


def measure(size_mib: int, repeat: int) -> dict:
    """One SSHWorker submission's counters and the throughput rows, against a fresh sshd."""
    with tempfile.TemporaryDirectory(prefix="rr-bench-") as scratch:
        folder = Path(scratch)
        sshd, port, key = start_sshd(folder)
        try:
            counters = one_submission(folder, port, key)
            rows, _ = throughput(folder, port, key, size_mib, repeat)
        finally:
            sshd.terminate()
            sshd.wait()
    return {"one_submission": counters, "size_mib": size_mib, "repeat": repeat,
            "throughput": [dict(zip(("method", "up_mib_s", "down_mib_s", "up_s", "down_s"),
                                    row, strict=True)) for row in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results = measure(args.size_mib, args.repeat)
    print("\nOne submission (iris starting_kit) through SSHWorker")
    print(f"{'measure':<22}{'value':>12}")
    for name, value in results["one_submission"].items():
        print(f"{name:<22}{value:>12}")
    print(f"\nThroughput, {args.size_mib} MiB (half random, half CSV), gzip both ways, "
          f"best of {args.repeat}, loopback")
    print(f"{'method':<42}{'up MiB/s':>10}{'down MiB/s':>12}{'up s':>8}{'down s':>8}")
    for row in results["throughput"]:
        print(f"{row['method']:<42}{row['up_mib_s']:>10.1f}{row['down_mib_s']:>12.1f}"
              f"{row['up_s']:>8.2f}{row['down_s']:>8.2f}")


if __name__ == "__main__":
    main()
