"""Tables of runner.display drawn by rich: untrusted names and messages shown as written."""

from __future__ import annotations

from collections import Counter

from rich.console import Console

from runner.display import leaderboard_table, status_table
from runner.leaderboard import rank
from runner.ledger import Submission
from runner.training_output import ScoreType

# A RAMP board's submission names are the participants' (runner.rampdb), not folder names.
NAME = "[bold]x[/]"
ERROR = "Traceback ...\nValueError: [/] closes [red]nothing[/red]"
TYPES = (ScoreType("acc", lower_is_better=False), ScoreType("nll", lower_is_better=True))


def _submission(name, state="scored", error="", acc=0.9, nll=0.3):
    scores = {"test": {"acc": acc, "nll": nll}, "valid": {"acc": acc, "nll": nll}}
    return Submission(name=name, state=state, attempts=0, error_msg=error, scores=scores,
                      train_time=1.5, valid_time=0.004, test_time=0.002, run_time=3.0,
                      peak_memory_mb=160.0, worker="", created_at=0.0, updated_at=0.0)


def _draw(renderable) -> str:
    console = Console(width=80, record=True, file=open("/dev/null", "w"))
    console.print(renderable)
    return console.export_text()


def test_status_shows_markup_in_names_and_errors_as_written():
    text = _draw(status_table("event", [_submission(NAME, "training_error", ERROR)],
                              Counter({NAME: 2})))
    assert NAME in text
    assert "ValueError: [/] closes" in text and "[red]nothing[/red]" in text
    assert "Traceback" not in text  # the last line only


def test_leaderboard_breaks_ties_with_the_next_score_and_keeps_names_whole():
    long_name = "a_rather_long_submission_name_x"
    entries = rank([_submission("b", nll=0.5), _submission(long_name, nll=0.2),
                    _submission(NAME, acc=0.95)], TYPES)
    assert [e.submission.name for e in entries] == [NAME, long_name, "b"]
    assert [e.rank for e in entries] == [1, 2, 3]
    text = _draw(leaderboard_table("board", entries, TYPES))
    assert long_name in text and NAME in text
    assert "0.004" in text and "0.002" in text  # milliseconds do not read 0.0
