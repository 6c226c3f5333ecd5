"""The ledger: checked transitions, exclusive claims, bounded retries, recovery."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from runner.ledger import SCHEMA, Ledger
from runner.states import TransitionError


@pytest.fixture
def ledger(tmp_path):
    with Ledger(tmp_path / "ledger.sqlite3") as ledger:
        yield ledger


def test_add_reports_only_new_names(ledger):
    assert ledger.add(["a", "b"]) == ["a", "b"]
    assert ledger.add(["b", "c"]) == ["c"]
    assert [s.state for s in ledger.all()] == ["new", "new", "new"]


def test_ledger_uses_write_ahead_logging(ledger):
    assert ledger._connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_concurrent_claims_never_share_a_submission(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    names = [f"s{i:03d}" for i in range(200)]
    with Ledger(path) as ledger:
        ledger.add(names)
    claimed: list[list[str]] = [[] for _ in range(4)]

    def claim_all(index):
        with Ledger(path) as own:
            while batch := own.claim(3, worker=f"d{index}"):
                claimed[index].extend(batch)

    threads = [threading.Thread(target=claim_all, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [name for batch in claimed for name in batch]
    assert sorted(everything) == names  # each claimed exactly once


def test_the_happy_path_records_scores_and_times(ledger):
    ledger.add(["a"])
    assert ledger.claim(5, worker="d") == ["a"]
    ledger.mark_training("a")
    ledger.mark_tested("a", run_time=3.5, peak_memory_mb=120.0)
    ledger.mark_scored("a", {"test": {"acc": 0.9}}, {"train": 1.0, "valid": 0.1, "test": 0.2})
    submission = ledger.get("a")
    assert submission.state == "scored"
    assert submission.scores == {"test": {"acc": 0.9}}
    assert (submission.train_time, submission.run_time, submission.peak_memory_mb) == (
        1.0, 3.5, 120.0)
    assert [t.to_state for t in ledger.transitions("a")] == [
        "new", "sent_to_training", "training", "tested", "scored"]


def test_tested_and_scored_in_one_commit_keep_both_transitions(ledger):
    """RAMP's tested -> scored stays in the history; the dispatcher pays one commit."""
    ledger.add(["a", "b"])
    ledger.claim(2, worker="d")
    ledger.mark_training("a")
    statements: list[str] = []
    ledger._connection.set_trace_callback(statements.append)
    ledger.mark_tested_and_scored("a", 3.5, 120.0, {"test": {"acc": 0.9}},
                                  {"train": 1.0, "valid": 0.1, "test": 0.2})
    ledger._connection.set_trace_callback(None)
    assert [s for s in statements if s in ("BEGIN IMMEDIATE", "COMMIT")] == [
        "BEGIN IMMEDIATE", "COMMIT"]
    submission = ledger.get("a")
    assert (submission.state, submission.scores, submission.run_time,
            submission.peak_memory_mb, submission.train_time) == (
        "scored", {"test": {"acc": 0.9}}, 3.5, 120.0, 1.0)
    assert [t.to_state for t in ledger.transitions("a")][-2:] == ["tested", "scored"]
    # Not in training: neither transition happens.
    with pytest.raises(TransitionError, match="'b' is 'sent_to_training'"):
        ledger.mark_tested_and_scored("b", 1.0, None, {}, {})
    assert ledger.get("b").state == "sent_to_training"
    assert [t.to_state for t in ledger.transitions("b")] == ["new", "sent_to_training"]


def test_a_transition_from_the_wrong_state_changes_nothing(ledger):
    ledger.add(["a"])
    with pytest.raises(TransitionError, match="'a' is 'new'; cannot move it to 'scored'"):
        ledger.mark_scored("a", {"test": {"acc": 1.0}}, {})
    assert ledger.get("a").state == "new"
    assert ledger.get("a").scores is None
    with pytest.raises(TransitionError, match="no submission 'zzz'"):
        ledger.mark_training("zzz")


def test_scoring_twice_is_refused(ledger):
    ledger.add(["a"])
    ledger.claim(1, worker="d")
    ledger.mark_training("a")
    ledger.mark_tested("a", 1.0, None)
    ledger.mark_scored("a", {"test": {"acc": 0.5}}, {})
    with pytest.raises(TransitionError):
        ledger.mark_scored("a", {"test": {"acc": 0.9}}, {})
    assert ledger.get("a").scores == {"test": {"acc": 0.5}}


def test_retries_are_counted_and_bounded(ledger):
    ledger.add(["a"])
    for expected in ("new", "new", "checking_error"):
        ledger.claim(1, worker="d")
        assert ledger.retry("a", "spot instance reclaimed", max_attempts=3) == expected
    submission = ledger.get("a")
    assert submission.attempts == 3
    assert submission.error_msg == "gave up after 3 attempts; last: spot instance reclaimed"


def test_recovery_counts_an_attempt_only_for_a_started_unsandboxed_run(ledger):
    ledger.add(["a", "b", "c", "d"])
    for _ in range(2):
        ledger.claim(4, worker="d")
        ledger.mark_training("b")  # started, not sandboxed: it may have killed its dispatcher
        ledger.mark_training("d", sandboxed=True)
        ledger.release("a", "shutdown")
        # c was claimed but had not started
        assert sorted(ledger.recover_abandoned(max_attempts=2)) == ["b", "c", "d"]
    assert {s.name: (s.state, s.attempts) for s in ledger.all()} == {
        "a": ("new", 0), "b": ("checking_error", 2), "c": ("new", 0), "d": ("new", 0)}
    assert ledger.get("b").error_msg == "the dispatcher died 2 times while running this submission"
    assert ledger.get("d").sandboxed and not ledger.get("b").sandboxed


def test_a_ledger_of_an_earlier_version_gains_the_new_columns(tmp_path):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:  # the schema before runs recorded their sandbox
        db.executescript(SCHEMA.replace("    sandboxed INTEGER NOT NULL DEFAULT 0,\n", ""))
        db.execute("INSERT INTO submissions (name, state, created_at, updated_at)"
                   " VALUES ('a', 'training', 0, 0)")
    with Ledger(path) as ledger:
        assert ledger.recover_abandoned(max_attempts=3) == ["a"]
        assert (ledger.get("a").state, ledger.get("a").attempts) == ("new", 1)


def test_rerun_only_from_a_final_state(ledger):
    ledger.add(["a"])
    with pytest.raises(TransitionError):
        ledger.rerun("a")
    ledger.claim(1, worker="d")
    ledger.mark_training("a")
    ledger.mark_training_error("a", "Traceback ...", 1.0, None)
    ledger.rerun("a")
    submission = ledger.get("a")
    assert (submission.state, submission.error_msg, submission.attempts) == ("new", "", 0)


def test_the_schema_refuses_a_state_ramp_does_not_know(ledger):
    ledger.add(["a"])
    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint"):
        ledger._connection.execute("UPDATE submissions SET state = 'done' WHERE name = 'a'")


def test_transitions_are_numbered_in_order_without_a_sequence_table(ledger):
    """Row ids, not AUTOINCREMENT (whose sqlite_sequence is one more page written at each
    transition): transitions are never deleted, so the ids still follow their order."""
    ledger.add(["a", "b"])
    ledger.claim(2, worker="d")
    tables = {row[0] for row in ledger._connection.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "sqlite_sequence" not in tables
    assert [(t.name, t.to_state) for t in ledger.transitions()] == [
        ("a", "new"), ("b", "new"), ("a", "sent_to_training"), ("b", "sent_to_training")]
