"""Run a command under supervision: a sandbox, limits, peak memory, death with its starter.

Standalone on purpose (standard library only): it is started with whatever Python a host
has, locally, on a Dask worker or on a remote machine, as

    python supervise.py [OPTIONS] -- COMMAND [ARG...]
    python supervise.py --check-sandbox

It runs as the leader of the run's process group (its starter gives it a new session) and
as a child subreaper, so that descendants that leave the group are still its own:
- ``--watch PID``: once PID is gone (a SIGKILLed dispatcher or Dask worker), the whole
  run is killed: no orphan keeps training after the process that owned it;
- ``--peak-rss FILE``: the peak memory, in MiB, of the run's whole tree is written to FILE;
- ``--reason FILE``: when the supervisor itself ends the run (a limit passed, or the sandbox
  could not start) it writes ``{"fault": "submission" | "event", "message": ...}`` there;
- ``--sandbox``: COMMAND runs in bubblewrap: new PID, IPC, UTS and network namespaces
  (``--network`` keeps the host's network), a fresh /proc, a minimal /dev, and a file
  system holding only /usr (and the /lib links), a few files of /etc, the prefixes of
  COMMAND's program and interpreter, the ``--ro PATH`` folders read-only, the ``--rw PATH``
  folders writable and ``--tmp DIR`` as /tmp and /dev/shm; ``--hide PATH`` puts an empty
  folder over PATH. Run as root, COMMAND runs as a uid of its own (no capabilities, no new
  privileges); as another user, as that user inside a user namespace. When the sandbox's
  first process dies, the kernel kills everything left in its PID namespace;
- limits, each ending the run with a reason naming it: ``--memory-limit-mb N`` (the tree's
  total proportional set size, sampled every TICK_SECONDS), ``--output-limit-mb N`` (the
  disk used under ``--rw`` and ``--tmp``; also each file's size, RLIMIT_FSIZE),
  ``--log-limit-mb N`` (COMMAND's output goes through the supervisor to its stdout: the head
  and the tail are kept, with a marker between, and the run is stopped),
  ``--max-processes N`` (processes and threads: RLIMIT_NPROC, plus the sampled count).

The exit code is the command's, or 128 + signal number when a signal ended it.
``--check-sandbox`` prints whether the sandbox works here and exits 0 if it does.
"""

import collections
import ctypes
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading

TICK_SECONDS = 0.25
# The file system is walked less often than memory is sampled: it costs more.
OUTPUT_EVERY_TICKS = 4
MIB = 1024 * 1024
# Run as root, the sandboxed command gets a uid of its own, unique while this supervisor
# lives, so that RLIMIT_NPROC counts exactly the run's processes.
UID_BASE = 2_000_000_000
PR_SET_CHILD_SUBREAPER = 36
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# What programs need of /etc; the rest (keys, credentials, the machine's config) stays out.
ETC_ENTRIES = ("passwd", "group", "hosts", "resolv.conf", "nsswitch.conf", "host.conf",
               "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "alternatives",
               "ssl/certs", "ca-certificates", "protocols", "services", "mime.types")
FLAGS = ("--sandbox", "--network", "--check-sandbox")
REPEATED = ("--ro", "--rw", "--hide")
VALUED = ("--watch", "--peak-rss", "--reason", "--tmp", "--memory-limit-mb",
          "--output-limit-mb", "--log-limit-mb", "--max-processes")
USAGE = ("usage: supervise.py [--watch PID] [--peak-rss FILE] [--reason FILE] [--sandbox "
         "[--network] [--ro PATH]... [--rw PATH]... [--hide PATH]...] [--tmp DIR] "
         "[--memory-limit-mb N] [--output-limit-mb N] [--log-limit-mb N] "
         "[--max-processes N] -- COMMAND [ARG...]\n       supervise.py --check-sandbox")


def start_time(pid):
    """The kernel's start time of ``pid`` (None once it is gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # fields[0] is the state, fields[19] the start time (fields 3 and 22 of proc(5)).
    return None if fields[0] in ("Z", "X") else fields[19]


def parse(argv):
    """Split ``argv`` into ({option: value}, command); repeated options give lists."""
    options = {name: [] for name in REPEATED}
    while argv and argv[0] != "--":
        name = argv[0]
        if name in FLAGS:
            options[name], argv = True, argv[1:]
            continue
        if name not in VALUED + REPEATED or len(argv) < 2:
            sys.exit(USAGE)
        if name in REPEATED:
            options[name].append(argv[1])
        else:
            options[name] = argv[1]
        argv = argv[2:]
    if options.get("--check-sandbox"):
        return options, []
    if len(argv) < 2:
        sys.exit(USAGE)
    for name in ("--memory-limit-mb", "--output-limit-mb", "--log-limit-mb", "--max-processes",
                 "--watch"):
        if name in options and not options[name].isdigit():
            sys.exit(f"supervise.py: {name} expects a whole number, got {options[name]!r}")
    return options, argv[1:]


# -- the sandbox ------------------------------------------------------------------------


def command_roots(program):
    """The folders a command needs to start: its program's and its interpreter's prefixes.

    ``/env/bin/ramp-test`` needs ``/env``; its ``#!`` interpreter (maybe a symlink into
    another prefix, as a venv's python is) needs its own.
    """
    found = shutil.which(program)
    if found is None:
        return []
    paths = [found]
    try:
        with open(found, "rb") as handle:
            first = handle.readline(4096)
    except OSError:
        first = b""
    if first.startswith(b"#!"):
        words = first[2:].decode(errors="replace").split()
        if words and os.path.basename(words[0]) == "env" and len(words) > 1:
            words = [shutil.which(words[1]) or words[1]]
        if words:
            paths.append(words[0])
    roots = []
    for path in paths:
        for candidate in (path, os.path.realpath(path)):
            root = os.path.dirname(os.path.dirname(candidate))
            if root not in ("/", "") and root not in roots:
                roots.append(root)
    return roots


def bwrap_argv(options, command, uid):
    """The bubblewrap command line that runs ``command`` in the sandbox (see the module)."""
    mounts = {}  # destination -> bwrap arguments; applied parents first

    def add(dest, *arguments):
        mounts.setdefault(os.path.normpath(dest), list(arguments))

    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            add(path, "--symlink", os.readlink(path), path)
        elif os.path.isdir(path):
            add(path, "--ro-bind", path, path)
    for entry in ETC_ENTRIES:
        add(f"/etc/{entry}", "--ro-bind-try", f"/etc/{entry}", f"/etc/{entry}")
    for path in [*options["--ro"], *command_roots(command[0])]:
        path = os.path.abspath(path)
        add(path, "--ro-bind", path, path)
    for path in options["--hide"]:
        path = os.path.abspath(path)
        add(path, "--tmpfs", path)
    for path in options["--rw"]:
        path = os.path.abspath(path)
        mounts[os.path.normpath(path)] = ["--bind", path, path]
    tmp = options.get("--tmp")
    if tmp:
        add("/tmp", "--bind", os.path.join(tmp, "tmp"), "/tmp")
        add("/dev/shm", "--bind", os.path.join(tmp, "shm"), "/dev/shm")
    # Folders bubblewrap creates on its own for a mount's parents are 0700 root's: the
    # unprivileged command could not walk through them.
    # Parents inside a read-only mount already exist and could not be made anyway.
    # A parent that is itself mounted (the run's /tmp, when the event lives below /tmp) is
    # made inside that mount, and is not replaced by a bare folder.
    mounted = [d for d, arguments in mounts.items() if arguments[0].startswith("--ro-bind")]
    for dest in list(mounts):
        parent = os.path.dirname(dest)
        while parent != "/" and parent not in mounts and not any(
                parent == m or parent.startswith(m + "/") for m in mounted):
            mounts[parent] = ["--perms", "0755", "--dir", parent]
            parent = os.path.dirname(parent)
    argv = ["bwrap", "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try", "--proc", "/proc", "--dev", "/dev"]
    if not options.get("--network"):
        argv.append("--unshare-net")
    if uid is None:
        argv.append("--unshare-user")
    else:
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    for dest in sorted(mounts, key=lambda d: (d.count("/"), d)):
        argv += mounts[dest]
    workdir = options["--rw"][0] if options["--rw"] else "/tmp" if tmp else "/"
    argv += ["--chdir", os.path.abspath(workdir), "--setenv", "HOME", "/tmp",
             "--setenv", "TMPDIR", "/tmp", "--"]
    if uid is not None:
        # Root's run drops to its own uid inside the sandbox: setpriv (util-linux) does it
        # after bubblewrap has mounted what root alone could reach (e.g. a venv in /root).
        argv += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                 "--inh-caps=-all", "--no-new-privs", "--"]
    return argv + list(command)


def check_sandbox():
    """Run ``true`` in the sandbox; return (works, why not)."""
    if shutil.which("bwrap") is None:
        return False, "bubblewrap (bwrap) is not installed"
    options = parse(["--sandbox", "--", "true"])[0]
    uid = UID_BASE + os.getpid() if os.geteuid() == 0 else None
    if uid is not None and shutil.which("setpriv") is None:
        return False, "setpriv (util-linux) is not installed"
    try:
        completed = subprocess.run(bwrap_argv(options, ["true"], uid), capture_output=True,
                                   text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        return False, f"bwrap failed: {error}"
    if completed.returncode != 0:
        return False, (completed.stderr.strip() or f"bwrap exited {completed.returncode}")[:500]
    return True, ""


def own_tree(paths, uid):
    """Give the sandbox's uid the writable folders (without following any link)."""
    for top in paths:
        os.lchown(top, uid, uid)
        for folder, dirs, files in os.walk(top):
            for name in dirs + files:
                os.lchown(os.path.join(folder, name), uid, uid)


# -- watching the run -------------------------------------------------------------------


def processes():
    """{pid: (ppid, state, threads)} of every process on the host."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(name)] = (int(fields[1]), fields[0], int(fields[17]))
    return table


def descendants(table, top):
    """The pids under ``top`` (itself included), parents first."""
    children = collections.defaultdict(list)
    for pid, (ppid, _, _) in table.items():
        children[ppid].append(pid)
    found, queue = [], [top]
    while queue:
        pid = queue.pop()
        if pid in table:
            found.append(pid)
        queue.extend(children.get(pid, ()))
    return found


def proportional_mib(pid):
    """The process's proportional set size in MiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def disk_mib(paths):
    """The disk space used under ``paths``, in MiB, links not followed."""
    total = 0
    for top in paths:
        for folder, dirs, files in os.walk(top):
            for name in dirs + files:
                try:
                    total += os.lstat(os.path.join(folder, name)).st_blocks * 512
                except OSError:
                    pass
    return total / MIB


class Log:
    """Copy a pipe to stdout keeping at most ``limit`` bytes: the head, a marker, the tail."""

    def __init__(self, pipe, limit_mb):
        self.pipe, self.limit_mb = pipe, limit_mb
        self.head_left = limit_mb * MIB // 2
        self.tail, self.tail_bytes, self.cut = collections.deque(), 0, 0
        self.overflowed = threading.Event()
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self):
        while chunk := os.read(self.pipe, 65536):
            if self.head_left > 0:
                head, chunk = chunk[:self.head_left], chunk[self.head_left:]
                _write(head)
                self.head_left -= len(head)
            if chunk:
                self.overflowed.set()
                self.tail.append(chunk)
                self.tail_bytes += len(chunk)
                while self.tail_bytes - len(self.tail[0]) >= self.limit_mb * MIB // 2:
                    self.cut += len(self.tail[0])
                    self.tail_bytes -= len(self.tail.popleft())

    def finish(self):
        """Write the marker and the tail once the pipe is closed."""
        self.thread.join(5)
        if self.tail:
            _write(cut_marker(self.cut, self.limit_mb).encode())
            _write(b"".join(self.tail))


def cut_marker(cut, limit_mb):
    """The line that replaces the part of a log that went past its limit."""
    return (f"\n[... {cut} bytes of output cut here: the log keeps its head and tail "
            f"within log_limit_mb={limit_mb} ...]\n")


def _write(data):
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]


class Run:
    """The supervised command and what the supervisor checks while it runs."""

    def __init__(self, options, command):
        self.options = options
        self.limits = {name: int(options[f"--{name.replace('_', '-')}"])
                       for name in ("memory_limit_mb", "output_limit_mb", "log_limit_mb",
                                    "max_processes")
                       if f"--{name.replace('_', '-')}" in options}
        tmp = options.get("--tmp")
        self.writable = [*options["--rw"], *([tmp] if tmp else [])]
        if tmp:
            for sub in ("tmp", "shm"):
                os.makedirs(os.path.join(tmp, sub), exist_ok=True)
        self.sandboxed = bool(options.get("--sandbox"))
        env = dict(os.environ)
        if self.sandboxed:
            uid = UID_BASE + os.getpid() if os.geteuid() == 0 else None
            if uid is not None:
                own_tree(self.writable, uid)
            argv = bwrap_argv(options, command, uid)
        else:
            argv = list(command)
            if tmp:
                env["TMPDIR"] = os.path.join(tmp, "tmp")
        self.reason = None
        self.peak_mib = 0.0
        info_read, info_write = os.pipe() if self.sandboxed else (None, None)
        if info_write is not None:
            argv[1:1] = ["--info-fd", str(info_write)]
        log_read, log_write = os.pipe() if "log_limit_mb" in self.limits else (None, None)
        self.child = subprocess.Popen(
            argv, env=env, preexec_fn=self._limit_self,
            stdout=log_write, stderr=subprocess.STDOUT if log_write is not None else None,
            pass_fds=[info_write] if info_write is not None else [])
        self.info = info_read
        self.started = not self.sandboxed
        if info_write is not None:
            os.close(info_write)
            os.set_blocking(info_read, False)
        self.log = None
        if log_write is not None:
            os.close(log_write)
            self.log = Log(log_read, self.limits["log_limit_mb"])

    def _limit_self(self):
        """In the child, before exec: the limits the kernel enforces by itself."""
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if "max_processes" in self.limits:
            n = self.limits["max_processes"]
            resource.setrlimit(resource.RLIMIT_NPROC, (n, n))
        if "output_limit_mb" in self.limits:
            size = self.limits["output_limit_mb"] * MIB
            resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    def tree(self, table):
        """The run's own processes: under bubblewrap's init, or the command and its tree."""
        if not self.sandboxed:
            return descendants(table, self.child.pid)
        inits = [pid for pid, (ppid, _, _) in table.items() if ppid == self.child.pid]
        return [pid for init in inits for pid in descendants(table, init)[1:]]

    def check(self, tick):
        """Sample the run; stop it with a reason when it passed a limit."""
        if not self.started:
            try:
                self.started = bool(os.read(self.info, 4096))
            except BlockingIOError:
                pass
        table = processes()
        self._reap_orphans(table)
        pids = self.tree(table)
        mib = sum(proportional_mib(pid) for pid in pids)
        self.peak_mib = max(self.peak_mib, mib)
        tasks = sum(table[pid][2] for pid in pids if pid in table)
        limits = self.limits
        if "memory_limit_mb" in limits and mib > limits["memory_limit_mb"]:
            self.stop("memory_limit_mb", f"used {mib:.0f} MB of memory")
        elif "max_processes" in limits and tasks >= limits["max_processes"]:
            self.stop("max_processes", f"reached {tasks} processes and threads")
        elif self.log is not None and self.log.overflowed.is_set():
            self.stop("log_limit_mb", "printed more than its log may hold")
        elif tick % OUTPUT_EVERY_TICKS == 0:
            self.check_output(strict=True)

    def check_output(self, strict):
        """Stop the run once its files use more than ``output_limit_mb``."""
        limit = self.limits.get("output_limit_mb")
        if limit is not None and self.writable:
            used = disk_mib(self.writable)
            # A file stopped by RLIMIT_FSIZE sits exactly at the limit.
            if used > limit or (not strict and used >= limit):
                self.stop("output_limit_mb", f"wrote {used:.0f} MB of files")

    def stop(self, limit, what):
        """Record why the run is stopped, then kill its whole tree."""
        if self.reason is None:
            self.reason = {"fault": "submission", "limit": limit, "message": (
                f"The submission {what}, more than {limit}={self.limits[limit]}: "
                "the run was stopped.")}
        self.kill()

    def kill(self):
        """SIGKILL the run's tree (the sandbox's init first: its namespace dies with it)."""
        # Under this subreaper, not only under the child: orphans were reparented here.
        table = processes()
        for pid in [self.child.pid, *descendants(table, os.getpid())[1:]]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def _reap_orphans(self, table):
        # Orphans of the run are reparented to this subreaper: reap them once they exit.
        for pid, (ppid, state, _) in table.items():
            if ppid == os.getpid() and state == "Z" and pid != self.child.pid:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass

    def finish(self, returncode):
        """Kill what is left, write the log's tail and the reason."""
        if not self.started:
            try:
                self.started = bool(os.read(self.info, 4096))
            except (BlockingIOError, OSError):
                pass
        if self.reason is None and returncode != 0:
            if not self.started:
                self.reason = {"fault": "event", "message": (
                    f"the sandbox (bubblewrap) could not start the run (exit {returncode}); "
                    "see the end of the log")}
            else:
                self.check_output(strict=False)
        self.kill()
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
        if self.log is not None:
            self.log.finish()
            # A run that printed past its limit and ended before a check saw it.
            if self.log.overflowed.is_set() and self.reason is None:
                self.stop("log_limit_mb", "printed more than its log may hold")


def set_subreaper():
    """Become the reaper of the run's orphans (Linux; elsewhere nothing changes)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def main(argv):
    """Run the command under supervision; return its exit code."""
    options, command = parse(argv)
    if options.get("--check-sandbox"):
        works, why = check_sandbox()
        print("sandbox: works" if works else f"sandbox: does not work: {why}")
        return 0 if works else 1
    watched = int(options["--watch"]) if "--watch" in options else None
    # The start time tells the watched process from a later one that reuses its pid.
    born = start_time(watched) if watched is not None else None
    if watched is not None and born is None:
        # The starter died before we could look at it: nobody would stop this run.
        return 128 + signal.SIGKILL
    set_subreaper()
    run = Run(options, command)
    tick = 0
    while True:
        try:
            returncode = run.child.wait(TICK_SECONDS)
            break
        except subprocess.TimeoutExpired:
            pass
        tick += 1
        if watched is not None and start_time(watched) != born:
            run.kill()
            os.killpg(os.getpgrp(), signal.SIGKILL)
        run.check(tick)
    run.finish(returncode)
    if "--peak-rss" in options:
        # ru_maxrss (KiB, Linux) covers a run too short to be sampled.
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        with open(options["--peak-rss"], "w") as handle:
            handle.write(f"{max(peak_kib / 1024, run.peak_mib):.1f}\n")
    if run.reason is not None and "--reason" in options:
        with open(options["--reason"], "w") as handle:
            json.dump(run.reason, handle)
    if returncode == 0 and run.reason is not None:
        return 128 + signal.SIGKILL  # a limit ended it: never a success
    return 128 - returncode if returncode < 0 else returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
