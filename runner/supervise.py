"""Run a command under supervision: a sandbox, limits, peak memory, death with its starter.

Standalone on purpose (standard library only): it is started with whatever Python a host
has, locally, on a Dask worker or on a remote machine, as

    python supervise.py [OPTIONS] -- COMMAND [ARG...]
    python supervise.py --check-sandbox

It runs as the leader of the run's process group (its starter gives it a new session) and
as a child subreaper, so that descendants that leave the group are still its own:
- ``--watch PID``: once PID is gone (a SIGKILLed dispatcher or Dask worker), the whole
  run is killed: no orphan keeps training after the process that owned it;
- ``--peak-rss FILE``: the peak memory, in MiB, of the run's whole tree is written to FILE
  (its cgroup's high-water mark, page cache it brought in included);
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
- limits, each ending the run with a reason naming it. The run gets a cgroup of its own
  (v2, or v1's memory, pids, cpu and cpuset controllers), entered before COMMAND starts,
  removed at its end: ``--memory-limit-mb N`` is a ceiling that counts shared memory,
  memfd and tmpfs files too, with no swap (an out-of-memory kill ends the run);
  ``--max-processes N`` caps processes and threads (``pids.max``: a refused fork ends the
  run); ``--cpus N`` is a CPU quota of N cores and, where the host has more and they are
  free, N cores no other run holds. ``--output-limit-mb N`` with ``--tmp DIR`` mounts a
  tmpfs of N MiB and DISK_INODES inodes over DIR and moves the ``--rw`` folders into it,
  bound back in place: the run writes nothing anywhere else, and a run that fails with its
  disk full has passed the limit. The disk is mounted in a mount namespace of the
  supervisor's own: the host never sees it and it dies with the supervisor's last process,
  however it is killed; at the run's own end (not at SIGTERM) what it left in the ``--rw``
  folders is copied out to the folders beneath, within N MiB, no link followed.
  ``--log-limit-mb N``: COMMAND's output
  goes through the supervisor to its stdout: the head and the tail are kept, with a marker
  between, and the run is stopped. Where the cgroup or the mount is refused (not root), the
  supervisor says so in one line on stderr and falls back: memory (the tree's proportional
  set size) and processes (RLIMIT_NPROC and a count) sampled every TICK_SECONDS, files
  measured under ``--rw`` and ``--tmp``. Each file's size is capped too (RLIMIT_FSIZE).
- SIGTERM ends the run and the supervisor, the run's cgroup removed (exit 143); the group
  of a supervisor killed outright is removed by the next supervisor on the host.

The exit code is the command's, or 128 + signal number when a signal ended it.
``--check-sandbox`` prints whether the sandbox works here and exits 0 if it does.
"""

import collections
import ctypes
import fcntl
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

TICK_SECONDS = 0.25
# The file system is walked less often than memory is sampled: it costs more.
OUTPUT_EVERY_TICKS = 4
MIB = 1024 * 1024
# Run as root, the sandboxed command gets a uid of its own, unique while this supervisor
# lives, so that RLIMIT_NPROC counts exactly the run's processes.
UID_BASE = 2_000_000_000
PR_SET_CHILD_SUBREAPER = 36
WAITED_SIGNALS = (signal.SIGCHLD, signal.SIGTERM)
CLONE_NEWNS = 0x20000
MNT_DETACH = 2
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18
CGROUP_ROOT = "/sys/fs/cgroup"
# A run's cgroup is ramp-run-<supervisor pid>-<its start time>: the folders of a supervisor
# that is gone are known as such and removed by the next one.
GROUP_PREFIX = "ramp-run-"
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuset")
CFS_PERIOD_US = 100_000
# bubblewrap's own two processes (its monitor and the namespace's init) are in the group.
SANDBOX_TASKS = 2
# One lock file per core, held while a run has the core: every supervisor of the host
# (slots of one dispatcher, other dispatchers) shares the allocation; the kernel releases
# a dead supervisor's locks.
CORE_LOCKS = "/run/ramp-runner/cores"
# The inodes of a run's disk: two orders of magnitude above what an honest run writes
# (sources, __pycache__, fold_i/ predictions, library caches in /tmp: hundreds), while a
# full disk stays cheap to walk (~1 s) and its inodes cost the kernel ~100 MB at most.
DISK_INODES = 100_000
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# What programs need of /etc; the rest (keys, credentials, the machine's config) stays out.
ETC_ENTRIES = ("passwd", "group", "hosts", "resolv.conf", "nsswitch.conf", "host.conf",
               "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "alternatives",
               "ssl/certs", "ca-certificates", "protocols", "services", "mime.types")
FLAGS = ("--sandbox", "--network", "--check-sandbox")
REPEATED = ("--ro", "--rw", "--hide")
VALUED = ("--watch", "--peak-rss", "--reason", "--tmp", "--memory-limit-mb",
          "--output-limit-mb", "--log-limit-mb", "--max-processes", "--cpus")
LIMITS = ("memory_limit_mb", "output_limit_mb", "log_limit_mb", "max_processes", "cpus")
USAGE = ("usage: supervise.py [--watch PID] [--peak-rss FILE] [--reason FILE] [--sandbox "
         "[--network] [--ro PATH]... [--rw PATH]... [--hide PATH]...] [--tmp DIR] "
         "[--memory-limit-mb N] [--output-limit-mb N] [--log-limit-mb N] "
         "[--max-processes N] [--cpus N] -- COMMAND [ARG...]\n"
         "       supervise.py --check-sandbox")


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
    for name in [*(f"--{limit.replace('_', '-')}" for limit in LIMITS), "--watch"]:
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
        for entry in walk(top):
            os.lchown(entry.path, uid, uid)


def walk(top):
    """Every entry under ``top`` (os.DirEntry), links not followed, without recursion: a
    submission's tree may be thousands of folders deep."""
    folders = [top]
    while folders:
        try:
            with os.scandir(folders.pop()) as entries:
                for entry in entries:
                    yield entry
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)
        except OSError:
            continue


# -- the run's disk ---------------------------------------------------------------------


class Disk:
    """The run's own disk: a tmpfs of ``limit_mb`` and DISK_INODES over ``tmp``, holding
    ``folders`` too (each moved into it and bound back in place), so that everything the run
    writes is on it.

    It is mounted in a mount namespace of the supervisor's own, which propagates nothing to
    the host: the host never sees it, and it goes with the last process of the namespace,
    however the supervisor ends (SIGKILLed at a timeout, with its Dask worker or its
    dispatcher). What the run left in ``folders`` is copied out (``copy_out``) to the
    folders beneath, reached through descriptors opened before the mounts.
    """

    def __init__(self, tmp, folders, limit_mb):
        private_mounts()
        self.tmp, self.folders, self.limit_mb = tmp, folders, limit_mb
        self.beneath = []
        mounted = []
        try:
            self.beneath = [os.open(folder, OPEN_FOLDER) for folder in folders]
            mount("tmpfs", tmp, "tmpfs", MS_NOSUID | MS_NODEV,
                  f"size={limit_mb}m,nr_inodes={DISK_INODES},mode=0755")
            mounted.append(tmp)
            for index, folder in enumerate(folders):
                store = os.path.join(tmp, "writable", str(index))
                copy_tree(folder, store)
                mount(store, folder, None, MS_BIND, None)
                mounted.append(folder)
            # A working folder inside one of them is the folder beneath until looked up anew.
            os.chdir(os.getcwd())
        except OSError:
            # The run falls back to the folders themselves (seen by the host alone).
            for point in reversed(mounted):
                unmount(point)
            self.close()
            raise

    def full(self):
        """Whether the disk has no room left: no inode, or less than 1 % (1 MiB) free."""
        disk = os.statvfs(self.tmp)
        size = disk.f_blocks * disk.f_frsize
        return disk.f_favail == 0 or disk.f_bavail * disk.f_frsize < max(MIB, size // 100)

    def copy_out(self):
        """Copy what the run left in its folders to the folders beneath (call it once the
        run's processes are gone); raise Oversized past ``limit_mb`` of files in all."""
        # Uncovered first: ".." from a folder beneath would lead back onto the disk.
        for folder in reversed(self.folders):
            unmount(folder)
        budget = [self.limit_mb * MIB, 0]
        for index, beneath in enumerate(self.beneath):
            source = os.open(os.path.join(self.tmp, "writable", str(index)), OPEN_FOLDER)
            try:
                copy_out(source, beneath, budget)
            finally:
                os.close(source)

    def close(self):
        """Close the descriptors of the folders beneath."""
        for descriptor in self.beneath:
            os.close(descriptor)
        self.beneath = []


class Oversized(Exception):
    """The files a run left add up to more than its disk holds (sparse files)."""


OPEN_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
CREATE_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def private_mounts():
    """Move this process to a mount namespace of its own whose mounts propagate nowhere."""
    _checked(libc().unshare(CLONE_NEWNS), "unshare the mount namespace")
    # The host's mounts are often shared (systemd): without this, ours would appear there.
    mount("none", "/", None, MS_REC | MS_PRIVATE, None)


def copy_tree(source, target):
    """Copy folders, regular files and links (as links) of ``source`` to a new ``target``,
    with their modification times (``copy_out`` skips what did not change)."""
    os.makedirs(target)
    shutil.copymode(source, target)
    for entry in walk(source):
        destination = os.path.join(target, os.path.relpath(entry.path, source))
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), destination)
        elif entry.is_dir(follow_symlinks=False):
            os.mkdir(destination)
            shutil.copymode(entry.path, destination)
        elif entry.is_file(follow_symlinks=False):
            shutil.copy2(entry.path, destination, follow_symlinks=False)


def copy_out(source, target, budget):
    """Copy the tree of folder descriptor ``source`` into folder descriptor ``target``.

    The run shaped ``source`` and may have planted links in ``target``: everything is
    reached through descriptors, one level at a time, no link is ever followed (a link is
    copied as a link, and one in ``target`` where a folder or file goes is replaced), and
    the walk keeps one pair of folders open at a time, whatever the depth. New and changed
    entries are copied: regular files (their permission bits only), folders, links, FIFOs
    and sockets; what the run removed stays. ``budget`` is [the bytes it may
    copy, the bytes copied so far]: Oversized(bytes) past it.
    """
    source, target = os.dup(source), os.dup(target)
    # Per level below the top: the entries of the parent still to copy.
    stack = []
    try:
        pending = _names(source)
        while True:
            if pending:
                name = pending.pop()
                if _copy_entry(source, target, name, budget):
                    source, target = _move(source, name), _move(target, name)
                    stack.append(pending)
                    pending = _names(source)
                continue
            if not stack:
                return
            pending = stack.pop()
            source, target = _move(source, ".."), _move(target, "..")
    finally:
        os.close(source)
        os.close(target)


def _names(folder):
    with os.scandir(folder) as entries:
        return [entry.name for entry in entries]


def _move(folder, name):
    """Open folder ``name`` (or "..") of descriptor ``folder`` and close ``folder``."""
    try:
        return os.open(name, OPEN_FOLDER, dir_fd=folder)
    finally:
        os.close(folder)


def _copy_entry(source, target, name, budget):
    """Copy entry ``name`` of ``source`` into ``target``; return whether it is a folder
    whose entries are to be copied next."""
    found = os.stat(name, dir_fd=source, follow_symlinks=False)
    mode = found.st_mode
    try:
        there = os.stat(name, dir_fd=target, follow_symlinks=False)
    except FileNotFoundError:
        there = None
    if there is not None:
        if stat.S_ISDIR(there.st_mode):
            # A folder the run replaced by another kind of entry stays as it was.
            return stat.S_ISDIR(mode)
        if stat.S_ISREG(mode) and stat.S_ISREG(there.st_mode) and (
                found.st_size, found.st_mtime_ns) == (there.st_size, there.st_mtime_ns):
            return False  # copied in at the start, unchanged
        os.unlink(name, dir_fd=target)
    permissions = stat.S_IMODE(mode) & 0o777
    if stat.S_ISDIR(mode):
        os.mkdir(name, permissions, dir_fd=target)
        return True
    if stat.S_ISLNK(mode):
        os.symlink(os.readlink(name, dir_fd=source), name, dir_fd=target)
    elif stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        # Kept as what they are: the starter refuses them in results.
        os.mknod(name, stat.S_IFMT(mode) | 0o600, dir_fd=target)
    elif stat.S_ISREG(mode):
        _copy_file(source, target, name, found, budget)
    return False


def _copy_file(source, target, name, found, budget):
    budget[1] += found.st_size
    if budget[1] > budget[0]:
        raise Oversized(budget[1])
    reader = os.open(name, OPEN_FILE, dir_fd=source)
    try:
        writer = os.open(name, CREATE_FILE, stat.S_IMODE(found.st_mode) & 0o777, dir_fd=target)
        try:
            offset = 0
            while offset < found.st_size:
                sent = os.sendfile(writer, reader, offset, min(found.st_size - offset, 1 << 30))
                if sent == 0:
                    break
                offset += sent
            os.utime(writer, ns=(found.st_atime_ns, found.st_mtime_ns))
        finally:
            os.close(writer)
    finally:
        os.close(reader)


# -- the run's cgroup -------------------------------------------------------------------


class Group:
    """The run's own cgroup: v2 (one folder) or v1 (one folder per controller).

    Memory counts what the run's processes hold and the shared memory, memfd and tmpfs
    files they write, with no swap; an out-of-memory kill ends the run. ``pids.max`` caps
    processes and threads; ``cpus`` cores are a CFS quota and, when the host has more
    cores than that and enough are free, a cpuset of cores no other run holds.
    Raises OSError when the host does not let this supervisor make it.
    """

    def __init__(self, limits, sandboxed):
        self.v2 = unified()
        reap_stale_groups()
        name = f"{GROUP_PREFIX}{os.getpid()}-{start_time(os.getpid())}"
        self.cores = []
        self.folders = {}
        try:
            self._make(name, limits, sandboxed)
        except OSError:
            self.remove()
            raise
        memory = self.folder("memory")
        if not self.v2:
            self.peak_file = os.path.join(memory, "memory.max_usage_in_bytes")
        elif os.path.exists(os.path.join(memory, "memory.peak")):
            self.peak_file = os.path.join(memory, "memory.peak")
        else:
            # v2 kernels before 5.19 keep no peak: the current use, read every tick, stands in.
            self.peak_file = os.path.join(memory, "memory.current")
        self.peak_mib = 0.0

    def folder(self, controller):
        """The group's folder for ``controller``."""
        return self.folders["" if self.v2 else controller]

    def _make(self, name, limits, sandboxed):
        settings = []
        if "memory_limit_mb" in limits:
            ceiling = limits["memory_limit_mb"] * MIB
            settings += [("memory", "memory.max" if self.v2 else "memory.limit_in_bytes", ceiling),
                         ("memory", "memory.swap.max", 0) if self.v2 else
                         ("memory", "memory.memsw.limit_in_bytes", ceiling)]
        if "max_processes" in limits:
            settings.append(("pids", "pids.max",
                             limits["max_processes"] + (SANDBOX_TASKS if sandboxed else 0)))
        if "cpus" in limits:
            quota = limits["cpus"] * CFS_PERIOD_US
            settings += [("cpu", "cpu.max", f"{quota} {CFS_PERIOD_US}")] if self.v2 else [
                ("cpu", "cpu.cfs_period_us", CFS_PERIOD_US), ("cpu", "cpu.cfs_quota_us", quota)]
            self.cores = claim_cores(limits["cpus"], self.v2)
        if self.cores:
            settings.append(("cpuset", "cpuset.cpus", ",".join(c for c, _ in self.cores)))
            if not self.v2:
                with open(f"{CGROUP_ROOT}/cpuset/cpuset.mems") as handle:
                    settings.append(("cpuset", "cpuset.mems", handle.read().strip()))
        # Memory and pids always: the peak and what was refused are read from them.
        controllers = sorted({controller for controller, _, _ in settings} | {"memory", "pids"})
        if self.v2:
            with open(f"{CGROUP_ROOT}/cgroup.subtree_control", "w") as handle:
                handle.write(" ".join(f"+{c}" for c in controllers))
            self.folders[""] = f"{CGROUP_ROOT}/{name}"
        else:
            self.folders.update((c, f"{CGROUP_ROOT}/{c}/{name}") for c in controllers)
        for folder in self.folders.values():
            os.mkdir(folder)
        for controller, file, value in settings:
            path = os.path.join(self.folder(controller), file)
            # Without swap accounting (v1) or swap (v2) there is no swap file to cap.
            if os.path.exists(path) or file not in ("memory.memsw.limit_in_bytes",
                                                    "memory.swap.max"):
                with open(path, "w") as handle:
                    handle.write(str(value))

    def enter(self):
        """Put the calling process in the group (the run's first process, before exec)."""
        # v1: the forked child has one thread, and moving the current thread ("0" in
        # tasks) skips the lock a whole-process move takes: an RCU grace period, 5-14 ms.
        file, me = ("cgroup.procs", str(os.getpid())) if self.v2 else ("tasks", "0")
        for folder in self.folders.values():
            with open(os.path.join(folder, file), "w") as handle:
                handle.write(me)

    def processes(self):
        """The pids in the group."""
        return group_processes(self.folder("memory"))

    def memory_mib(self):
        """The group's peak memory so far, in MiB."""
        try:
            with open(self.peak_file) as handle:
                self.peak_mib = max(self.peak_mib, int(handle.read()) / MIB)
        except (OSError, ValueError):
            pass
        return self.peak_mib

    def out_of_memory(self):
        """Whether the kernel killed a process of the run for memory."""
        memory = self.folder("memory")
        if self.v2:
            return _count(os.path.join(memory, "memory.events"), "oom_kill") > 0
        return _count(os.path.join(memory, "memory.oom_control"), "oom_kill") > 0

    def refused_processes(self):
        """Whether the kernel refused the run a process or thread at ``pids.max``."""
        return _count(os.path.join(self.folder("pids"), "pids.events"), "max") > 0

    def remove(self):
        """Kill everything in the group, remove its folders, free its cores."""
        remove_group(list(self.folders.values()))
        for _, handle in self.cores:
            handle.close()
        self.cores = []


def _count(path, key):
    try:
        with open(path) as handle:
            for line in handle:
                words = line.split()
                if len(words) == 2 and words[0] == key:
                    return int(words[1])
    except (OSError, ValueError):
        pass
    return 0


def group_processes(folder):
    """The pids in the cgroup ``folder`` (none once it is gone)."""
    try:
        with open(os.path.join(folder, "cgroup.procs")) as handle:
            return [int(line) for line in handle if line.strip()]
    except (OSError, ValueError):
        return []


def remove_group(folders):
    """SIGKILL what is in a group until it is empty, then remove its folders (within 2 s)."""
    deadline = time.monotonic() + 2
    while folders and time.monotonic() < deadline:
        for pid in group_processes(folders[0]):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for folder in list(folders):
            try:
                os.rmdir(folder)
                folders.remove(folder)
            except FileNotFoundError:
                folders.remove(folder)
            except OSError:
                pass
        if folders:
            time.sleep(0.01)
    if folders:
        print(f"supervise: could not remove the run's cgroup {folders[0]}", file=sys.stderr)


def unified():
    """Whether this host's cgroups are v2's single hierarchy."""
    return os.path.exists(f"{CGROUP_ROOT}/cgroup.controllers")


def reap_stale_groups():
    """Remove the groups of supervisors that are gone (killed before they could), with
    what is left in them."""
    tops = [CGROUP_ROOT] if unified() else [f"{CGROUP_ROOT}/{c}" for c in V1_CONTROLLERS]
    try:
        names = {n for n in os.listdir(tops[0]) if n.startswith(GROUP_PREFIX)}
    except OSError:
        return
    for name in names:
        pid, _, born = name[len(GROUP_PREFIX):].partition("-")
        if pid.isdigit() and start_time(int(pid)) != born:
            remove_group([f"{top}/{name}" for top in tops if os.path.isdir(f"{top}/{name}")])


def claim_cores(count, v2):
    """Lock ``count`` of the host's cores for the run: [(core, open lock file)], or [] when
    the run may use them all or fewer are free (then its CPU quota alone confines it)."""
    path = f"{CGROUP_ROOT}/cpuset.cpus.effective" if v2 else \
        f"{CGROUP_ROOT}/cpuset/cpuset.effective_cpus"
    try:
        with open(path) as handle:
            cores = cpu_list(handle.read())
        os.makedirs(CORE_LOCKS, mode=0o700, exist_ok=True)
    except OSError:
        return []
    held = []
    for core in cores if count < len(cores) else []:
        try:
            handle = open(os.path.join(CORE_LOCKS, core), "a")
        except OSError:
            break
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        held.append((core, handle))
        if len(held) == count:
            return held
    for _, handle in held:
        handle.close()
    return []


def cpu_list(text):
    """The cores of a cpuset list such as ``0-3,8``."""
    cores = []
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            cores += [str(n) for n in range(int(first), int(last or first) + 1)]
    return cores


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
        for entry in walk(top):
            try:
                total += entry.stat(follow_symlinks=False).st_blocks * 512
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
        self.limits = {name: int(options[f"--{name.replace('_', '-')}"]) for name in LIMITS
                       if f"--{name.replace('_', '-')}" in options}
        tmp = options.get("--tmp")
        self.writable = [*options["--rw"], *([tmp] if tmp else [])]
        self.sandboxed = bool(options.get("--sandbox"))
        self.reason = None
        self.peak_mib = 0.0
        self.disk = None
        self.group = None
        fallbacks = []
        if tmp:
            os.makedirs(tmp, exist_ok=True)
            if "output_limit_mb" in self.limits:
                try:
                    self.disk = Disk(tmp, options["--rw"], self.limits["output_limit_mb"])
                except OSError as error:
                    fallbacks.append(f"no disk of its own ({error}): its files are "
                                     "measured every second")
            for sub in ("tmp", "shm"):
                os.makedirs(os.path.join(tmp, sub), exist_ok=True)
        if self.limits.keys() & {"memory_limit_mb", "max_processes", "cpus"}:
            try:
                self.group = Group(self.limits, self.sandboxed)
            except OSError as error:
                fallbacks.append(f"no cgroup ({error}): memory and processes are sampled "
                                 f"every {TICK_SECONDS} s, CPU is not confined")
        if fallbacks:
            print(f"supervise: limits fall back to sampling: {'; '.join(fallbacks)}",
                  file=sys.stderr, flush=True)
        try:
            self._start(options, command, tmp)
        except BaseException:
            self.release()
            raise

    def _start(self, options, command, tmp):
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
        """In the child, before exec: its cgroup, and the limits the kernel enforces by
        itself."""
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WAITED_SIGNALS)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if self.group is not None:
            self.group.enter()
        elif "max_processes" in self.limits:
            n = self.limits["max_processes"]
            resource.setrlimit(resource.RLIMIT_NPROC, (n, n))
        # Even on the run's own disk: a sparse file can be far larger than the disk.
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
        """Look at the run; stop it with a reason when it passed a limit."""
        self._see_started()
        self._reap_orphans()
        if self.group is not None:
            self.check_group()
        else:
            self.sample()
        if self.reason is None and self.log is not None and self.log.overflowed.is_set():
            self.stop("log_limit_mb", "printed more than its log may hold")
        elif self.reason is None and self.disk is None and tick % OUTPUT_EVERY_TICKS == 0:
            self.check_output(strict=True)

    def check_group(self):
        """Stop the run once the kernel refused it memory or a process."""
        self.peak_mib = self.group.memory_mib()
        if self.group.out_of_memory():
            self.stop("memory_limit_mb", "tried to use more memory")
        elif self.group.refused_processes():
            self.stop("max_processes", "tried to start more processes and threads")

    def sample(self):
        """Without a cgroup: sum the memory and count the tasks of the run's tree."""
        table = processes()
        pids = self.tree(table)
        mib = sum(proportional_mib(pid) for pid in pids)
        self.peak_mib = max(self.peak_mib, mib)
        tasks = sum(table[pid][2] for pid in pids if pid in table)
        if "memory_limit_mb" in self.limits and mib > self.limits["memory_limit_mb"]:
            self.stop("memory_limit_mb", f"used {mib:.0f} MB of memory")
        elif "max_processes" in self.limits and tasks >= self.limits["max_processes"]:
            self.stop("max_processes", f"reached {tasks} processes and threads")

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
            # Said after "the run was stopped: " (runner.ramptest.stop_message).
            self.reason = {"fault": "submission", "limit": limit, "message": (
                f"the submission {what}, more than {limit}={self.limits[limit]}")}
        self.kill()

    def kill(self):
        """SIGKILL the run's tree (the sandbox's init first: its namespace dies with it)."""
        if self.group is not None:
            pids = self.group.processes()
        else:
            # Under this subreaper, not only under the child: orphans were reparented here.
            pids = descendants(processes(), os.getpid())[1:]
        for pid in [self.child.pid, *pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def _reap_orphans(self):
        # Orphans of the run are reparented to this subreaper: reap them once they exit,
        # leaving the command itself to Popen.
        while True:
            try:
                ended = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if ended is None or ended.si_pid == self.child.pid:
                return
            os.waitpid(ended.si_pid, 0)

    def _see_started(self):
        if not self.started:
            try:
                self.started = bool(os.read(self.info, 4096))
            except (BlockingIOError, OSError):
                pass

    def finish(self, returncode):
        """Kill what is left, write the log's tail and the reason."""
        self._see_started()
        if self.group is not None and self.reason is None:
            self.check_group()
        if self.reason is None and returncode != 0:
            if not self.started:
                self.reason = {"fault": "event", "message": (
                    f"the sandbox (bubblewrap) could not start the run (exit {returncode}); "
                    "see the end of the log")}
            elif self.disk is not None and self.disk.full():
                self.stop("output_limit_mb", "filled its disk and tried to write more")
            elif self.disk is None:
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
        if self.group is not None:
            self.peak_mib = self.group.memory_mib()

    def deliver(self):
        """Copy what the run left in its folders off its disk, seen by this supervisor
        only, to the folders beneath, where its starter reads it."""
        if self.disk is None:
            return
        try:
            self.disk.copy_out()
        except Oversized as error:
            self.stop("output_limit_mb", f"left files of at least {error.args[0] / MIB:.0f} "
                      "MB in all (sparse)")
        except OSError as error:
            if self.reason is None:
                self.reason = {"fault": "event", "message": (
                    f"the run's files could not be copied off its disk: {error}")}

    def release(self):
        """Remove the run's cgroup; its disk goes with this process's mount namespace."""
        if self.group is not None:
            self.group.remove()
        if self.disk is not None:
            self.disk.close()


def set_subreaper():
    """Become the reaper of the run's orphans (Linux; elsewhere nothing changes)."""
    try:
        libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def libc():
    """The C library, its calls setting ``ctypes.get_errno()``."""
    return ctypes.CDLL(None, use_errno=True)


def _checked(result, what):
    if result != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"{what}: {os.strerror(number)}")


def mount(source, target, fstype, flags, data):
    """mount(2) (OSError on failure)."""
    _checked(libc().mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                          ctypes.c_ulong(flags), data.encode() if data else None),
             f"mount {target}")


def unmount(target):
    """Detach the mount at ``target`` now, even if something still holds it."""
    _checked(libc().umount2(target.encode(), MNT_DETACH), f"unmount {target}")


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
    # Waited for, not handled: the run's end wakes the loop at once, and SIGTERM ends the
    # run cleanly (its cgroup removed) instead of killing the supervisor.
    signal.pthread_sigmask(signal.SIG_BLOCK, WAITED_SIGNALS)
    run = Run(options, command)
    try:
        returncode, ended_by = watch(run, watched, born)
        run.finish(returncode)
        if ended_by is None:
            run.deliver()
    finally:
        run.release()
    if ended_by is not None:
        if ended_by == signal.SIGKILL:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        return 128 + ended_by
    if "--peak-rss" in options:
        # Without a cgroup, ru_maxrss (KiB, Linux) covers a run too short to be sampled.
        peak_kib = 0 if run.group else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        with open(options["--peak-rss"], "w") as handle:
            handle.write(f"{max(peak_kib / 1024, run.peak_mib):.1f}\n")
    if run.reason is not None and "--reason" in options:
        with open(options["--reason"], "w") as handle:
            json.dump(run.reason, handle)
    if returncode == 0 and run.reason is not None:
        return 128 + signal.SIGKILL  # a limit ended it: never a success
    return 128 - returncode if returncode < 0 else returncode


def watch(run, watched, born):
    """Wait for the run's end, checking it every TICK_SECONDS; return (its exit code, the
    signal that ended the supervision: SIGTERM, SIGKILL once the watched process is gone,
    or None)."""
    ended_by = None
    next_tick, tick = time.monotonic() + TICK_SECONDS, 0
    while True:
        returncode = run.child.poll()
        if returncode is not None:
            return returncode, ended_by
        wait = next_tick - time.monotonic()
        if wait > 0:
            got = signal.sigtimedwait(WAITED_SIGNALS, wait)
            if got is not None and got.si_signo == signal.SIGTERM:
                ended_by = signal.SIGTERM
                run.kill()
            continue
        next_tick, tick = next_tick + TICK_SECONDS, tick + 1
        if watched is not None and start_time(watched) != born:
            ended_by = signal.SIGKILL
            run.kill()
        run.check(tick)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
