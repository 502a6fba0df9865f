"""The privacy audit's typed results: what the signed manifest's `privacy` section holds (figures, no images)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Decision = Literal["released", "held", "released_by_operator", "not_measured"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AttackScore(_Frozen):
    """One membership-inference attack: how well its score tells training (member) from audit samples.

    auc 0.5 is chance; 1.0 means every member scores above every non-member. tpr_at_1pct_fpr is the share of
    members caught while at most 1 % of non-members are wrongly flagged (coarse when non_members < 100).
    """

    auc: float = Field(ge=0, le=1)
    tpr_at_1pct_fpr: float = Field(ge=0, le=1)
    members: int = Field(ge=1)
    non_members: int = Field(ge=1)


class PoolAttack(_Frozen):
    """The synthetic pool as attack surface: distance of real samples to their nearest synthetic image.

    dcr_ratio_*: median distance from each synthetic image to its closest member sample divided by the same to
    its closest non-member sample (equal numbers of each); well below 1 means the pool sits on training samples.
    """

    pool: int = Field(ge=1)  # synthetic images of this modality in the hand-off
    pixel: AttackScore
    feature: AttackScore
    dcr_ratio_pixel: float = Field(ge=0)
    dcr_ratio_feature: float = Field(ge=0)


class DPSummary(_Frozen):
    """Differentially private training at the site (DP-SGD, `invcoss_core/privacy/dp.py`) and its guarantee.

    (epsilon, delta) bound what the handed-off weights reveal about any one training sample, over `steps` steps at
    Poisson `sample_rate`; `scope` says what the guarantee does not cover (a subject's several samples, the feature
    statistics and the synthetic pool).
    """

    epsilon: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    noise_multiplier: float = Field(gt=0)
    max_grad_norm: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=1)
    accountant: str
    scope: str


class PrivacyReport(_Frozen):
    """The manifest's `privacy` section: the site's membership-inference audit of this hand-off and its decision.

    decision: `released` (measured, calibrated AUC ≤ max_mia_auc), `held` (above it: the site does not hand off),
    `released_by_operator` (above it, released by the explicit `privacy.release_above_max` setting), `not_measured`
    (no audit split possible, see `reason`).
    """

    measured: bool
    reason: str = ""  # why the audit is not measured
    audit_fraction: float = Field(ge=0, lt=1)
    train_subjects: int = Field(ge=0)
    audit_subjects: int = Field(ge=0)
    model_loss: AttackScore | None = None  # uncalibrated loss threshold on the handed-off model
    calibrated_loss: AttackScore | None = None  # loss after − loss before (the reference model); the policy's figure
    reference: Literal["incoming", "random"] | None = None  # the calibration's reference model
    synthetic_pool: PoolAttack | None = None
    gate_catch_rate: dict[str, float] = Field(default_factory=dict)  # disguised training copies blocked, per transform
    gate_false_block_rate: float | None = None  # audit (never trained) samples the gate would block
    max_mia_auc: float = Field(ge=0.5, le=1)
    decision: Decision
    dp: DPSummary | None = None
    seconds: float = Field(0.0, ge=0)  # the audit's own time

    @model_validator(mode="after")
    def _consistent(self) -> PrivacyReport:
        if self.measured and (self.model_loss is None or self.calibrated_loss is None):
            raise ValueError("a measured privacy report must carry model_loss and calibrated_loss")
        if self.measured == (self.decision == "not_measured"):
            raise ValueError(f"decision {self.decision!r} does not match measured={self.measured}")
        return self


__all__ = ["AttackScore", "DPSummary", "Decision", "PoolAttack", "PrivacyReport"]
