"""A submission's states, named as in RAMP's database, and the moves allowed between them.

``Move`` is the one table of transitions: each move names the states it may start from and
the state it ends in. Both sources (the standalone ledger and a RAMP board) check every
transition against it with ``check_move``, so the two cannot disagree on what is allowed.

Modelled on celery's ``celery.states`` and rq's ``JobStatus``: a ``StrEnum`` member equals
its string, so what the ledger stores and what RAMP's database holds stay the same strings.
"""

from __future__ import annotations

from enum import Enum, StrEnum

from runner.errors import RunnerError


class SubmissionState(StrEnum):
    """Where a submission is (``Submission.state`` in ramp-database, same names)."""

    NEW = "new"
    SENT_TO_TRAINING = "sent_to_training"
    TRAINING = "training"
    TESTED = "tested"
    SCORED = "scored"
    # The submission failed, ran past its timeout or left unusable results.
    TRAINING_ERROR = "training_error"
    # The system could not run it, or gave up after too many lost attempts.
    CHECKING_ERROR = "checking_error"


# Waiting for a worker: RAMP's frontend shows their queue_position.
QUEUED_STATES = (SubmissionState.NEW, SubmissionState.SENT_TO_TRAINING)
# Claimed by a dispatcher whose run of it is not over.
RUNNING_STATES = (SubmissionState.SENT_TO_TRAINING, SubmissionState.TRAINING,
                  SubmissionState.TESTED)
# Over: only a rerun moves them again. Summaries list them in this order.
FINAL_STATES = (SubmissionState.SCORED, SubmissionState.TRAINING_ERROR,
                SubmissionState.CHECKING_ERROR)


class TransitionError(RunnerError, RuntimeError):
    """A state change asked of a submission that is not in a state it may start from."""

    exit_code = 2


class Move(Enum):
    """Every allowed change of state: the states it may start from, the state it ends in."""

    CLAIM = (SubmissionState.NEW,), SubmissionState.SENT_TO_TRAINING
    START = (SubmissionState.SENT_TO_TRAINING,), SubmissionState.TRAINING
    TEST = (SubmissionState.TRAINING,), SubmissionState.TESTED
    SCORE = (SubmissionState.TESTED,), SubmissionState.SCORED
    # From any running state: a submission refused at setup fails before it trains.
    FAIL = RUNNING_STATES, SubmissionState.TRAINING_ERROR
    GIVE_UP = RUNNING_STATES, SubmissionState.CHECKING_ERROR
    # A lost run, a shutdown or a dead dispatcher: the submission waits again.
    REQUEUE = RUNNING_STATES, SubmissionState.NEW
    RERUN = FINAL_STATES, SubmissionState.NEW

    def __init__(self, sources: tuple[SubmissionState, ...], target: SubmissionState):
        self.sources = sources
        self.target = target


def check_move(name: str, current: str, move: Move) -> SubmissionState:
    """The state ``move`` takes submission ``name`` to from ``current``; TransitionError
    when it may not start from there."""
    if current not in move.sources:
        raise TransitionError(
            f"submission {name!r} is '{current}'; cannot move it to '{move.target}' "
            f"(only from {', '.join(move.sources)})"
        )
    return move.target
