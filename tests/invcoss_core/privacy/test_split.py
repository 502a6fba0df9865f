"""The audit split: by subject, reproducible from the seed, never a fake split with too few subjects."""

from __future__ import annotations

import logging

import pytest

from invcoss_core.privacy import audit_split


def test_audit_split_holds_out_whole_subjects_reproducibly() -> None:
    subjects = [f"s{i // 5}" for i in range(50)]  # 10 subjects of 5 samples each
    first = audit_split(subjects, 0.15, seed=3)
    again = audit_split(subjects, 0.15, seed=3)
    assert first.measured and (first.audit_index == again.audit_index).all()
    held = {subjects[i] for i in first.audit_index}
    trained = {subjects[i] for i in first.train_index}
    assert len(held) == 2 and first.audit_subjects == 2 and first.train_subjects == 8  # round(10 · 0.15) = 2
    assert not held & trained  # no subject on both sides
    assert len(first.audit_index) + len(first.train_index) == len(subjects)
    other = [audit_split(subjects, 0.15, seed=s) for s in range(6)]
    assert len({tuple(o.audit_index) for o in other}) > 1  # the seed decides which subjects


def test_audit_split_with_one_subject_is_not_measured_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        split = audit_split(["only"] * 12, 0.15, seed=0)
    assert not split.measured and len(split.audit_index) == 0 and len(split.train_index) == 12
    assert "not measured" in caplog.text and "subject" in split.reason


def test_audit_split_fraction_zero_turns_the_audit_off() -> None:
    split = audit_split(["a", "b", "c"], 0.0, seed=0)
    assert not split.measured and len(split.train_index) == 3 and "audit_fraction" in split.reason


def test_audit_split_keeps_a_training_subject() -> None:
    split = audit_split(["a", "a", "b"], 0.9, seed=0)
    assert split.measured and split.train_subjects == 1 and split.audit_subjects == 1
