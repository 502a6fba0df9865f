"""The audit split: a seeded share of a site's training subjects kept out of training as non-members."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from invcoss_core.data.sampling import stable_seed

logger = logging.getLogger(__name__)

__all__ = ["NO_AUDIT", "AuditSplit", "audit_split"]


@dataclass(frozen=True)
class AuditSplit:
    """Which samples train (members) and which are held out for the audit (non-members), by subject.

    train_index / audit_index: sample indices (sorted); measured: False when no split was possible (then every
    sample trains and `reason` says why).
    """

    train_index: np.ndarray
    audit_index: np.ndarray
    train_subjects: int
    audit_subjects: int
    fraction: float
    measured: bool
    reason: str = ""


def audit_split(subjects: Sequence[str], fraction: float, seed: int) -> AuditSplit:
    """Hold out max(1, round(n · fraction)) of the n subjects (at least one stays for training).

    Args:
        subjects: the subject of each sample, in sample order.
        fraction: `privacy.audit_fraction`; 0 turns the audit off.
        seed: the run seed; the same seed and subjects give the same split.
    Returns:
        AuditSplit. With fewer than 2 subjects (or fraction 0) nothing is held out and the audit is not measured:
        a warning says so, and no figure is made up.
    """
    names = sorted(set(subjects))
    everything = np.arange(len(subjects))
    empty = np.zeros(0, dtype=np.int64)
    if fraction <= 0:
        return AuditSplit(everything, empty, len(names), 0, fraction, False, "privacy.audit_fraction is 0")
    if len(names) < 2:
        reason = (
            f"only {len(names)} training subject(s): no subject can be held out for the membership audit without "
            "mixing one subject's samples into both sides; add subjects to measure it"
        )
        logger.warning("privacy audit not measured: %s", reason)
        return AuditSplit(everything, empty, len(names), 0, fraction, False, reason)
    count = min(len(names) - 1, max(1, round(len(names) * fraction)))
    order = np.random.default_rng(stable_seed(seed, "audit-subjects")).permutation(len(names))
    held = {names[i] for i in order[:count]}
    audit = np.array([i for i, s in enumerate(subjects) if s in held], dtype=np.int64)
    train = np.array([i for i, s in enumerate(subjects) if s not in held], dtype=np.int64)
    logger.info("privacy audit: %d of %d subjects held out of training", count, len(names))
    return AuditSplit(train, audit, len(names) - count, count, fraction, True)


NO_AUDIT = AuditSplit(  # the split of a stage that was not audited (a manifest recording only its DP guarantee)
    train_index=np.zeros(0, dtype=np.int64),
    audit_index=np.zeros(0, dtype=np.int64),
    train_subjects=0,
    audit_subjects=0,
    fraction=0.0,
    measured=False,
    reason="no audit was run for this stage",
)
