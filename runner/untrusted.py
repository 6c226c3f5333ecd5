"""Text a submission shaped (its errors, its output, its file names) made visible, never
obeyed: control characters and bidirectional overrides are shown as escapes before such
text reaches a terminal, a log line or what the ledger and a RAMP board store.

An exception message can carry ``ESC ]0;...BEL`` (retitles the organiser's terminal),
``ESC [2J`` (clears it), OSC 52 (writes its clipboard) or ``ESC [6n`` (makes it type a
reply); rich's ``Text`` strips only a few C0 characters, not ESC.
"""

from __future__ import annotations

import logging
import re

# C0 controls but tab and newline, DEL, C1 controls, and the characters that reorder
# what follows them on screen (Trojan Source): Arabic letter mark, LRM/RLM, the
# embeddings and overrides, the isolates.
_HIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def visible(text: str) -> str:
    """``text`` with every control character and bidi override shown as its escape
    (``\\x1b``, ``\\u202e``); tabs and newlines are kept."""
    return _HIDDEN.sub(_escape, text)


class VisibleLogText(logging.Filter):
    """A logging filter that shows control characters of every record's message as
    escapes (install it on each handler: filters on a logger do not see the records its
    children propagate)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = visible(record.getMessage()), None
        return True
