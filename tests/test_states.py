"""Submission states have one home: runner/states.py names them and their moves."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from runner.states import Move, SubmissionState, TransitionError, check_move

RUNNER = Path(__file__).resolve().parent.parent / "runner"
STATE_NAMES = {state.value for state in SubmissionState}
# A state written inside a longer string, as SQL spells it: ``WHERE state = 'new'``.
QUOTED_STATE = re.compile(rf"'({'|'.join(STATE_NAMES)})'")
# Programs shipped to run on their own (in a sandbox, on a remote host) import nothing of
# runner/; the one that writes a fold's state.txt spells ramp-test's fold states itself.
STANDALONE = {RUNNER / "supervise.py", RUNNER / "ingest.py"}


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the docstring nodes of ``tree`` (prose may name a state)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _state_literals(path: Path) -> list[str]:
    """``file:line: 'text'`` for every string of ``path`` that spells a submission state."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = _docstrings(tree)
    return [f"{path.relative_to(RUNNER.parent)}:{node.lineno}: {node.value!r}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings
            and (node.value in STATE_NAMES or QUOTED_STATE.search(node.value))]


def test_no_submission_state_is_spelled_outside_states_py():
    literals = [literal for path in sorted(RUNNER.rglob("*.py"))
                if path != RUNNER / "states.py" and path not in STANDALONE
                for literal in _state_literals(path)]
    assert literals == [], "use runner.states.SubmissionState:\n" + "\n".join(literals)


def test_a_move_from_a_state_it_does_not_start_from_is_refused():
    assert check_move("a", "sent_to_training", Move.FAIL) == SubmissionState.TRAINING_ERROR
    with pytest.raises(TransitionError, match=(
            r"^submission 'a' is 'new'; cannot move it to 'training_error' "
            r"\(only from sent_to_training, training, tested\)$")):
        check_move("a", "new", Move.FAIL)
