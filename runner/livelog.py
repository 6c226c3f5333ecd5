"""A running submission's log, live: one file per running submission on the dispatcher's
disk, in ``<ledger>.live/``, and what shows it (``ramp-runner logs``, the live view).

``ramp-runner logs`` is a process of its own, so the dispatcher keeps the live copy where
any process of the organiser can read it. A local run's supervisor writes its log straight
into that file (the supervisor already bounds it: ``log_limit_mb``); a remote run's worker
appends the new bytes at each poll (SSH, AWS) or as the Dask task sends them, at most
``REFRESH_BYTES`` per refresh: a run that printed more since the last one shows its newest
bytes after a marker, and its whole log is installed in ``logs_dir`` when it ends.
The file is removed when its run is torn down.

Everything shown comes from the submission: it is decoded leniently, its control
characters shown as escapes (``runner.untrusted``) and each line cut at ``LINE_CHARS``.
"""

from __future__ import annotations

import codecs
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from runner.untrusted import visible

logger = logging.getLogger("runner.livelog")

FOLDER_SUFFIX = ".live"
# The most new bytes one refresh of a remote run brings to the dispatcher (one SSH poll, one
# tick of a Dask task): a bound on each poll's answer and on what a Dask scheduler holds.
REFRESH_BYTES = 64 * 1024
# The longest line shown; the rest of it is counted, not shown.
LINE_CHARS = 2000
# What the live view reads from the end of a file to find its last line.
LAST_LINE_BYTES = 4096
# How often ``follow`` looks at the file and the submission's state.
FOLLOW_SECONDS = 0.25


def folder(ledger_path: str | os.PathLike[str]) -> Path:
    """The event's folder of live logs, beside its ledger."""
    return Path(f"{ledger_path}{FOLDER_SUFFIX}")


def live_path(live_folder: str | os.PathLike[str], submission: str) -> Path:
    """The live log of ``submission`` in ``live_folder``."""
    return Path(live_folder) / f"{submission}.log"


def skipped_marker(count: int) -> bytes:
    """What stands in the live copy for bytes it never received (they are in the log
    installed when the run ends)."""
    return (f"\n[... {count} bytes not shown live: the log installed at the end of the run "
            "has them ...]\n").encode()


def window(size: int, offset: int) -> int:
    """Where to start reading a log of ``size`` bytes of which ``offset`` were seen: at most
    ``REFRESH_BYTES`` are read, the newest."""
    return max(offset, size - REFRESH_BYTES)


class LiveCopy:
    """The live copy of one run's log, written by its worker on the dispatcher's machine.

    ``live_folder`` None (a worker made without a dispatcher) keeps nothing. Failing to
    write it (a full disk) never touches the run: the copy stops, with one warning. The
    copy holds at most ``limit_bytes`` (the worker's ``log_limit_mb``).
    """

    def __init__(self, live_folder: str | os.PathLike[str] | None, submission: str,
                 limit_bytes: int):
        self.path = None if live_folder is None else live_path(live_folder, submission)
        self.limit_bytes = limit_bytes
        # Bytes of the run's log accounted for (written here, or skipped).
        self.offset = 0
        self._written = 0
        # A Dask run's bytes arrive on the client's thread, its last ones on the slot's.
        self._lock = threading.Lock()

    def start(self) -> Path | None:
        """A new, empty file for a new run (a new file, not the old one emptied: a reader
        still following an earlier run keeps reading that one); its path."""
        if self.path is None:
            return None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.unlink(missing_ok=True)
            self.path.touch()
        except OSError as error:
            self._give_up(error)
        return self.path

    def add(self, data: bytes, start: int) -> None:
        """Append ``data``, the bytes of the run's log from byte ``start`` on."""
        with self._lock:
            self._add(data, start)

    def _add(self, data: bytes, start: int) -> None:
        if self.path is None:
            return
        if start < self.offset:  # already here
            data, start = data[self.offset - start:], self.offset
        chunk = skipped_marker(start - self.offset) if start > self.offset else b""
        chunk += data
        room = self.limit_bytes - self._written
        if len(chunk) > room:
            chunk = chunk[:max(0, room)]
        self.offset = start + len(data)
        if not chunk:
            return
        try:
            with open(self.path, "ab") as file:
                file.write(chunk)
        except OSError as error:
            self._give_up(error)
            return
        self._written += len(chunk)

    def catch_up(self, log: bytes) -> None:
        """Append what the run's whole ``log`` (brought back at its end) holds beyond what
        was seen, bounded as a refresh is."""
        if len(log) > self.offset:
            start = window(len(log), self.offset)
            self.add(log[start:], start)

    def catch_up_file(self, log: Path) -> None:
        """``catch_up`` from the run's whole log brought back as a file (only the part
        that is appended is read)."""
        if self.path is None:
            return
        try:
            with open(log, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                if size <= self.offset:
                    return
                start = window(size, self.offset)
                file.seek(start)
                self.add(file.read(REFRESH_BYTES), start)
        except OSError:
            return  # no log came back: collecting says so

    def remove(self) -> None:
        """Remove the file (the run was torn down); bytes arriving later are dropped."""
        with self._lock:
            if self.path is not None:
                self.path.unlink(missing_ok=True)
                self.path = None

    def _give_up(self, error: OSError) -> None:
        logger.warning("the live log %s cannot be written (%s): it stops here", self.path,
                       error)
        self.path = None


class LogText:
    """Bytes of a log in, lines to show out: decoded leniently (a character split between
    two reads is kept whole), control characters escaped, each line cut at ``line_chars``.
    A carriage return ends a line, as on a terminal (progress bars)."""

    def __init__(self, line_chars: int = LINE_CHARS):
        self.line_chars = line_chars
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""
        self._cut = 0

    def feed(self, data: bytes) -> list[str]:
        """The lines that ``data`` completes."""
        text = self._decoder.decode(data).replace("\r\n", "\n").replace("\r", "\n")
        *complete, rest = text.split("\n")
        lines = []
        for piece in complete:
            lines.append(self._line(self._partial + piece))
            self._partial, self._cut = "", 0
        self._keep(rest)
        return lines

    def flush(self) -> list[str]:
        """The last line, when the log does not end with a newline."""
        self._keep(self._decoder.decode(b"", final=True))
        if not self._partial and not self._cut:
            return []
        line = self._line(self._partial)
        self._partial, self._cut = "", 0
        return [line]

    def _keep(self, text: str) -> None:
        # A line that never ends must not grow without bound: past line_chars it is counted.
        self._partial += text
        if len(self._partial) > self.line_chars:
            self._cut += len(self._partial) - self.line_chars
            self._partial = self._partial[:self.line_chars]

    def _line(self, text: str) -> str:
        cut = self._cut + max(0, len(text) - self.line_chars)
        shown = visible(text[:self.line_chars])
        return f"{shown} [... {cut} more characters]" if cut else shown


def last_line(live_folder: Path, submission: str, width: int) -> str:
    """The last non-blank line of ``submission``'s live log, escaped and cut to ``width``
    (empty when there is none)."""
    try:
        with open(live_path(live_folder, submission), "rb") as file:
            file.seek(max(0, os.fstat(file.fileno()).st_size - LAST_LINE_BYTES))
            tail = file.read(LAST_LINE_BYTES)
    except OSError:
        return ""
    lines = [line for line in tail.decode(errors="replace").splitlines() if line.strip()]
    if not lines:
        return ""
    shown = visible(lines[-1].strip())
    return shown if len(shown) <= width else shown[:max(0, width - 1)] + "…"


def dispatcher_alive(ledger_path: Path) -> bool:
    """Whether a dispatcher holds the event's lock (``runner.eventlock``), read from the
    kernel's table of locks without taking it (taking it, even for an instant, could make
    a dispatcher starting then refuse to run). True when the table cannot be read."""
    try:
        stat = os.stat(ledger_path)
        with open("/proc/locks") as locks:
            table = locks.read()
    except OSError:
        return True
    device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    return any(fields[1:2] == ["FLOCK"] and device in fields
               for fields in (line.split() for line in table.splitlines()))


def _replaced(handle, path: Path) -> bool:
    """Whether ``path`` now names another file than the open ``handle``."""
    try:
        return os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino
    except OSError:
        return False  # removed: the run is being torn down


def follow(live_file: Path, still_running: Callable[[], bool], show: Callable[[str], None],
           keep_following: bool, dispatcher: Callable[[], bool] = lambda: True,
           seconds: float = FOLLOW_SECONDS) -> bool:
    """Show ``live_file``'s lines with ``show``; with ``keep_following``, go on until
    ``still_running()`` is False (the file is read to its end first). Returns False when
    ``dispatcher()`` says the dispatcher is gone while the submission still runs.

    The file is opened once: when its run is torn down and the file removed, what the run
    wrote is still read to the end.
    """
    text = LogText()
    handle = None
    try:
        while True:
            running = still_running()
            if handle is None:
                try:
                    handle = open(live_file, "rb")
                except FileNotFoundError:
                    handle = None
            if handle is not None:
                while chunk := handle.read(REFRESH_BYTES):
                    for line in text.feed(chunk):
                        show(line)
                if running and _replaced(handle, live_file):
                    # A dead dispatcher's file, replaced by this run's when it started.
                    handle.close()
                    handle = None
                    continue
            if not keep_following or not running:
                break
            if not dispatcher():
                return False
            time.sleep(seconds)
        for line in text.flush():
            show(line)
        return True
    finally:
        if handle is not None:
            handle.close()
