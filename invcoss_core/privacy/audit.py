"""The privacy audit of one stage's hand-off, run on the site after training and before anything leaves.

`audit_stage` attacks the artifact as a recipient could — the handed-off model and the synthetic pool — with the
site's training samples as members and its held-out audit subjects (`audit_split`) as non-members, and decides
whether the hand-off may leave under `privacy.max_mia_auc` (`decide`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from invcoss_core.config import PrivacyConfig, StageConfig
from invcoss_core.data import SiteDataset, TensorImages
from invcoss_core.models import MultiModalMAE, build_model
from invcoss_core.privacy.attacks import (
    calibrated_loss_attack,
    dcr_ratio,
    loss_attack,
    per_sample_losses,
    pool_distance_attack,
)
from invcoss_core.privacy.report import AttackScore, Decision, DPSummary, PoolAttack, PrivacyReport
from invcoss_core.privacy.split import AuditSplit, audit_split

logger = logging.getLogger(__name__)

__all__ = [
    "AuditInputs",
    "audit_handoff",
    "audit_stage",
    "decide",
    "hold_message",
    "not_measured",
    "privacy_line",
    "split_for_audit",
    "stack_samples",
]


@dataclass(frozen=True)
class AuditInputs:
    """What run_stage needs besides the stage itself: the held-out (non-member) samples and how they were chosen.

    non_members: (M, C, *img_size) samples of the audit subjects (never trained on); split: the subject split.
    """

    non_members: torch.Tensor
    split: AuditSplit


def split_for_audit(dataset: SiteDataset, fraction: float, seed: int) -> tuple[TensorImages, AuditInputs]:
    """A site's training samples minus its audit subjects (`privacy.audit_fraction`), and the audit's inputs.

    With too few subjects nothing is held out: every sample trains and the audit is reported as not measured.
    """
    split = audit_split(dataset.subjects, fraction, seed)
    samples = dataset.tensors()
    train = TensorImages(samples[split.train_index]) if split.measured else dataset
    return train, AuditInputs(non_members=samples[split.audit_index], split=split)


def stack_samples(data: Dataset[torch.Tensor] | torch.Tensor, limit: int, generator: torch.Generator) -> torch.Tensor:
    """At most `limit` samples of a dataset, a seeded random subset in index order, stacked (K, C, *S)."""
    n = data.shape[0] if isinstance(data, torch.Tensor) else len(data)  # type: ignore[arg-type]
    index = torch.arange(n) if n <= limit else torch.randperm(n, generator=generator)[:limit].sort().values
    if isinstance(data, torch.Tensor):
        return data[index]
    return torch.stack([data[int(i)] for i in index])


def decide(calibrated_auc: float | None, config: PrivacyConfig) -> Decision:
    """The policy: hold a hand-off whose calibrated AUC exceeds `max_mia_auc` unless the operator released it."""
    if calibrated_auc is None:
        return "not_measured"
    if calibrated_auc <= config.max_mia_auc:
        return "released"
    return "released_by_operator" if config.release_above_max else "held"


def hold_message(report: PrivacyReport) -> str | None:
    """The operator's message for a held hand-off (None when it may leave): the figure and what to do."""
    if report.decision != "held" or report.calibrated_loss is None:
        return None
    return (
        f"privacy audit: the calibrated membership-inference AUC is {report.calibrated_loss.auc:.3f}, above "
        f"privacy.max_mia_auc = {report.max_mia_auc:.2f} (TPR at 1 % FPR {report.calibrated_loss.tpr_at_1pct_fpr:.3f}, "
        f"{report.train_subjects} training / {report.audit_subjects} audit subjects): the hand-off is held on this "
        "site. Lower what the model memorises (fewer epochs, more subjects) "
        "and rerun the stage, or release it anyway with privacy.release_above_max = true in this site's [stage.privacy]"
        " (recorded in the signed manifest)"
    )


def privacy_line(report: PrivacyReport) -> str:
    """One line for CLIs and reports: the decision and the figures it rests on (no patient data)."""
    calibrated, raw = report.calibrated_loss, report.model_loss
    dp = (
        f"DP-SGD epsilon {report.dp.epsilon:.2f} at delta {report.dp.delta:g} (per sample, weights only)"
        if report.dp is not None
        else None
    )
    if calibrated is None or raw is None:  # PrivacyReport guarantees both when measured
        return f"not measured ({report.reason})" + (f"; {dp}" if dp else "")
    parts = [
        f"{report.decision}: calibrated MIA AUC {calibrated.auc:.3f} (max {report.max_mia_auc:.2f}, "
        f"TPR@1%FPR {calibrated.tpr_at_1pct_fpr:.3f}), loss AUC {raw.auc:.3f}",
    ]
    if report.synthetic_pool is not None:
        pool = report.synthetic_pool
        parts.append(
            f"pool AUC pixel {pool.pixel.auc:.3f} / feature {pool.feature.auc:.3f}, "
            f"DCR ratio {pool.dcr_ratio_pixel:.3f} / {pool.dcr_ratio_feature:.3f}"
        )
    if dp is not None:
        parts.append(dp)
    parts.append(f"{report.train_subjects} train / {report.audit_subjects} audit subjects, {report.seconds:.1f} s")
    return "; ".join(parts)


def not_measured(split: AuditSplit, config: PrivacyConfig, dp: DPSummary | None = None) -> PrivacyReport:
    """The report of a stage whose audit could not be measured (no figure is made up)."""
    return PrivacyReport(
        measured=False,
        reason=split.reason,
        audit_fraction=split.fraction,
        train_subjects=split.train_subjects,
        audit_subjects=split.audit_subjects,
        max_mia_auc=config.max_mia_auc,
        decision="not_measured",
        dp=dp,
    )


def _pool_attack(
    model: MultiModalMAE, members: torch.Tensor, non_members: torch.Tensor, pool: torch.Tensor, modality: str
) -> PoolAttack:
    k = min(members.shape[0], non_members.shape[0])
    device = model.device
    feats = [model.embed(x.to(device, torch.float32), modality) for x in (members, non_members, pool.float())]
    centre = torch.cat(feats[:2]).mean(dim=0)  # raw ViT features share a large common component (see gate.py)
    fm, fn, fp = (f - centre for f in feats)
    pm, pn, pp = (x.float().reshape(x.shape[0], -1) for x in (members, non_members, pool))
    return PoolAttack(
        pool=int(pool.shape[0]),
        pixel=pool_distance_attack(pm, pn, pp, "euclidean"),
        feature=pool_distance_attack(fm, fn, fp, "cosine"),
        dcr_ratio_pixel=dcr_ratio(pp, pm[:k], pn[:k], "euclidean"),
        dcr_ratio_feature=dcr_ratio(fp, fm[:k], fn[:k], "cosine"),
    )


@torch.no_grad()
def audit_stage(
    *,
    model: MultiModalMAE,
    reference: MultiModalMAE,
    reference_kind: str,
    modality: str,
    members: Dataset[torch.Tensor] | torch.Tensor,
    inputs: AuditInputs,
    pool: torch.Tensor | None,
    config: PrivacyConfig,
    seed: int,
    dp: DPSummary | None = None,
) -> PrivacyReport:
    """Attack a stage's hand-off with the site's members and held-out non-members; decide the policy.

    Args:
        model: the model as handed off; reference: one that never saw this site's images (the incoming model, or
            a random one for the first stage: `reference_kind` "incoming" / "random").
        members: the samples the stage trained on; inputs: the audit subjects' samples and the split.
        pool: (K, C, *img_size) the synthetic images of this modality in the hand-off (None or empty: no pool).
        config: `privacy` settings (sample caps, mask repeats, max_mia_auc, operator release).
        seed: the run seed (which samples and masks the audit uses).
        dp: the DP-SGD guarantee of the stage, recorded as is.
    Returns:
        PrivacyReport with both loss attacks, the pool attack, the decision and the audit's time.
    """
    if not inputs.split.measured or inputs.non_members.shape[0] == 0:
        return not_measured(inputs.split, config, dp)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    mem = stack_samples(members, config.audit_samples, generator)
    non = stack_samples(inputs.non_members, config.audit_samples, generator)
    after_m, before_m = per_sample_losses([model, reference], mem, modality, generator, repeats=config.mask_repeats)
    after_n, before_n = per_sample_losses([model, reference], non, modality, generator, repeats=config.mask_repeats)
    uncalibrated: AttackScore = loss_attack(after_m, after_n)
    calibrated: AttackScore = calibrated_loss_attack(after_m, before_m, after_n, before_n)
    pool_attack = _pool_attack(model, mem, non, pool, modality) if pool is not None and pool.shape[0] else None
    decision = decide(calibrated.auc, config)
    report = PrivacyReport(
        measured=True,
        audit_fraction=inputs.split.fraction,
        train_subjects=inputs.split.train_subjects,
        audit_subjects=inputs.split.audit_subjects,
        model_loss=uncalibrated,
        calibrated_loss=calibrated,
        reference="incoming" if reference_kind == "incoming" else "random",
        synthetic_pool=pool_attack,
        max_mia_auc=config.max_mia_auc,
        decision=decision,
        dp=dp,
        seconds=round(time.perf_counter() - started, 3),
    )
    logger.info(
        "privacy audit (%s): loss AUC %.3f, calibrated AUC %.3f (max %.2f) -> %s",
        modality,
        uncalibrated.auc,
        calibrated.auc,
        config.max_mia_auc,
        decision,
    )
    return report


def audit_handoff(
    *,
    config: StageConfig,
    modality: str,
    student: MultiModalMAE,
    incoming_model: MultiModalMAE | None,
    members: Dataset[torch.Tensor],
    inputs: AuditInputs,
    pool: torch.Tensor | None,
    dp: DPSummary | None = None,
) -> PrivacyReport:
    """`audit_stage` with the calibration reference of the issue: the incoming model, or a seeded random one.

    Args:
        config: the stage's settings (`privacy`, `seed`, `model`).
        incoming_model: the frozen model the stage started from (None for the first stage).
    """
    if incoming_model is not None:
        reference, kind = incoming_model, "incoming"
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 7919)  # a model that never saw any image, reproducible from the seed
            reference, kind = build_model(config.model).to(student.device).eval(), "random"
    return audit_stage(
        model=student,
        reference=reference,
        reference_kind=kind,
        modality=modality,
        members=members,
        inputs=inputs,
        pool=pool,
        config=config.privacy,
        seed=config.seed,
        dp=dp,
    )
