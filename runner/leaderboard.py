"""Rank the scored submissions of an event."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from runner.ledger import Submission
from runner.states import SubmissionState
from runner.training_output import BAGGED_STEPS, ScoreType

SPLITS = BAGGED_STEPS


@dataclass(frozen=True)
class Entry:
    """One line of the leaderboard."""

    rank: int
    submission: Submission
    scores: dict[str, float]


def rank(submissions: Iterable[Submission], score_types: Sequence[ScoreType],
         split: str = "test") -> list[Entry]:
    """Rank scored submissions by their bagged ``split`` scores: the first score type
    first, ties broken by the next ones, each in the kit's direction.

    Submissions equal on every score share a rank. A score a submission lacks ranks it
    last on that score rather than failing the whole board.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    if not score_types:
        raise ValueError("the kit declares no score type to rank by")
    scored = [s for s in submissions
              if s.state == SubmissionState.SCORED and s.scores and split in s.scores]

    def key(submission: Submission) -> tuple[float, ...]:
        return tuple(_oriented(submission.scores[split].get(t.name), t) for t in score_types)

    scored.sort(key=lambda s: (key(s), s.name))
    entries: list[Entry] = []
    for position, submission in enumerate(scored, start=1):
        previous = entries[-1] if entries else None
        tied = previous is not None and key(previous.submission) == key(submission)
        entries.append(Entry(previous.rank if tied else position, submission,
                             dict(submission.scores[split])))
    return entries


def _oriented(value: float | None, score_type: ScoreType) -> float:
    """The value as "lower ranks first"; a missing or non-finite score ranks last."""
    if value is None or not math.isfinite(value):
        return math.inf
    return value if score_type.lower_is_better else -value
