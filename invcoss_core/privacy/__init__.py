"""Privacy audit of the hand-off: the audit split, membership-inference attacks, the report and the policy."""

from invcoss_core.privacy.attacks import (
    attack_scores,
    calibrated_loss_attack,
    dcr_ratio,
    loss_attack,
    nearest_distance,
    per_sample_losses,
    pool_distance_attack,
)
from invcoss_core.privacy.audit import (
    AuditInputs,
    audit_handoff,
    audit_stage,
    decide,
    hold_message,
    not_measured,
    privacy_line,
    split_for_audit,
    stack_samples,
)
from invcoss_core.privacy.report import AttackScore, DPSummary, PoolAttack, PrivacyReport
from invcoss_core.privacy.split import NO_AUDIT, AuditSplit, audit_split

__all__ = [
    "NO_AUDIT",
    "AttackScore",
    "AuditInputs",
    "AuditSplit",
    "DPSummary",
    "PoolAttack",
    "PrivacyReport",
    "attack_scores",
    "audit_handoff",
    "audit_split",
    "audit_stage",
    "calibrated_loss_attack",
    "dcr_ratio",
    "decide",
    "hold_message",
    "loss_attack",
    "nearest_distance",
    "not_measured",
    "per_sample_losses",
    "pool_distance_attack",
    "privacy_line",
    "split_for_audit",
    "stack_samples",
]
