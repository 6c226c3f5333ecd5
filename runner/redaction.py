"""Keeping the event's credentials out of reprs, error messages and logs."""

from __future__ import annotations

import dataclasses
import logging
import re
import typing
from typing import Any

if typing.TYPE_CHECKING:
    from runner.config import EventConfig

HIDDEN = "<hidden>"
# Credentials that can reach a log without being in the config: botocore's debug output
# names the access key id it signs with and sends the session token as a header, whether
# they came from the config, the environment or ~/.aws/credentials.
CREDENTIAL_PATTERNS = (
    re.compile(r"(Credential=)[^/\s,'\"]+"),
    re.compile(r"(X-Amz-Security-Token['\"]?\s*[:=]\s*b?['\"]?)[^'\"\s,}]+", re.IGNORECASE),
)


def secret(**kwargs: Any) -> Any:
    """A dataclass field holding a credential: kept out of reprs and error messages."""
    return dataclasses.field(repr=False, metadata={"secret": True}, **kwargs)


def is_secret(field: dataclasses.Field) -> bool:
    """Whether ``field`` was declared with ``secret()``."""
    return bool(field.metadata.get("secret"))


class RedactSecrets(logging.Filter):
    """A logging filter that replaces the given secret values by ``<hidden>`` in every
    record's message and traceback (botocore's debug output carries the access key id).

    Install it on each handler (``install_redaction``): filters on a logger do not see the
    records its children propagate.
    """

    def __init__(self, secrets: typing.Iterable[str]):
        super().__init__()
        # Longest first, so that a secret containing another is hidden whole.
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        """``text`` with every secret and every signed credential replaced by ``<hidden>``."""
        for value in self.secrets:
            text = text.replace(value, HIDDEN)
        for pattern in CREDENTIAL_PATTERNS:
            text = pattern.sub(rf"\g<1>{HIDDEN}", text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.redact(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        # The traceback is now text; handlers must not format the raw exception again.
        record.exc_info = None
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def install_redaction(config: EventConfig, logger: logging.Logger | None = None) -> None:
    """Hide the config's secrets in everything the handlers of ``logger`` (the root logger
    by default) write, whatever the level. Call it after the handlers are set up."""
    redactor = RedactSecrets(config.secret_values())
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(redactor)
