"""Who is at fault when a run ends without scores: the outcomes the dispatcher records.

Workers raise these on purpose; the dispatcher maps each to one state, so what becomes of a
submission depends on what happened, not on which library raised what.
"""

from __future__ import annotations


class SubmissionError(Exception):
    """The participant's code failed or left unusable results: ``training_error``."""


class EventError(ValueError):
    """The event's configuration or files cannot be used: ``checking_error``, not retried."""


class InfrastructureError(RuntimeError):
    """The machine, the network or the cloud failed: the submission is run again."""
