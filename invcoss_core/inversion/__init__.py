"""Model inversion (InvCoSS): InvUNet generator, the four losses, the synthesis loop, the privacy gate, replay."""

from invcoss_core.inversion.gate import GateOutcome, NearestReal, RealReference, apply_gate, nearest_real
from invcoss_core.inversion.invunet import InvUNet
from invcoss_core.inversion.losses import (
    InversionTerms,
    LossShapeError,
    batch_token_stats,
    norm_loss,
    repulsion_loss,
    task_loss,
    tv_loss,
)
from invcoss_core.inversion.preview import preview_png
from invcoss_core.inversion.synthesize import (
    InversionError,
    SynthesisResult,
    Synthesizer,
    images_needed,
    mean_pairwise_cosine,
    pixel_inversion,
    synthesize,
)

__all__ = [
    "GateOutcome",
    "InvUNet",
    "InversionError",
    "InversionTerms",
    "LossShapeError",
    "NearestReal",
    "RealReference",
    "SynthesisResult",
    "Synthesizer",
    "apply_gate",
    "batch_token_stats",
    "images_needed",
    "mean_pairwise_cosine",
    "nearest_real",
    "norm_loss",
    "pixel_inversion",
    "preview_png",
    "repulsion_loss",
    "synthesize",
    "task_loss",
    "tv_loss",
]
