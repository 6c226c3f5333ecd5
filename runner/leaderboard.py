"""Rank the scored submissions of an event."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from runner.ledger import Submission
from runner.ramptest import ScoreType


@dataclass(frozen=True)
class Entry:
    """One line of the leaderboard."""

    rank: int
    submission: Submission
    scores: dict[str, float]


def rank(submissions: Iterable[Submission], score_types: Sequence[ScoreType],
         split: str = "test") -> list[Entry]:
    """Rank scored submissions by the bagged ``split`` score of the first score type.

    Ties share a rank; the direction (higher or lower is better) is the kit's.
    """
    if not score_types:
        raise ValueError("the kit declares no score type to rank by")
    lead = score_types[0]
    scored = [s for s in submissions if s.state == "scored" and s.scores and split in s.scores]
    sign = 1.0 if lead.lower_is_better else -1.0
    scored.sort(key=lambda s: (sign * s.scores[split][lead.name], s.name))
    entries: list[Entry] = []
    for position, submission in enumerate(scored, start=1):
        value = submission.scores[split][lead.name]
        previous = entries[-1] if entries else None
        tied = previous is not None and previous.scores[lead.name] == value
        entries.append(Entry(previous.rank if tied else position, submission,
                             dict(submission.scores[split])))
    return entries
