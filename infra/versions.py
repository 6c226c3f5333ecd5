"""Semantic versions derived from content, for Image Builder's immutable versioned resources."""

from __future__ import annotations

import hashlib
import json


def content_version(*parts: object) -> str:
    """`1.<a>.<b>` from 40 bits of the SHA-256 of the parts (JSON), so any change gives a new one.

    Each node stays below 2**20, well inside Image Builder's per-node limit.
    """
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode()).hexdigest()
    return f"1.{int(digest[:5], 16)}.{int(digest[5:10], 16)}"
