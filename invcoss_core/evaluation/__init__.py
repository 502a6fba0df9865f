"""Evaluation: forgetting measures (probes, held-out reconstruction, accuracy-matrix metrics) and the benchmark."""

from invcoss_core.evaluation.metrics import (
    MeanSd,
    MetricError,
    average_accuracy,
    avg_prev,
    backward_transfer,
    forgetting,
    mean_sd,
    recon_increase,
)
from invcoss_core.evaluation.probes import ProbeScores, ProbeSettings, balanced_accuracy, probe_scores
from invcoss_core.evaluation.recon import ReconScore, ReconSettings, decoder_probe_loss, masked_recon_loss

__all__ = [
    "MeanSd",
    "MetricError",
    "ProbeScores",
    "ProbeSettings",
    "ReconScore",
    "ReconSettings",
    "average_accuracy",
    "avg_prev",
    "backward_transfer",
    "balanced_accuracy",
    "decoder_probe_loss",
    "forgetting",
    "masked_recon_loss",
    "mean_sd",
    "probe_scores",
    "recon_increase",
]
