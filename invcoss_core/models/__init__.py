"""Model definitions: the multi-modal MAE backbone and its factory."""

from invcoss_core.models.mae import (
    POOLINGS,
    EncoderOutput,
    MAEOutput,
    ModelInputError,
    MultiModalMAE,
    build_model,
    centre_patch_indices,
    export_monai_vit_state_dict,
    masked_patch_loss,
)

__all__ = [
    "POOLINGS",
    "EncoderOutput",
    "MAEOutput",
    "ModelInputError",
    "MultiModalMAE",
    "build_model",
    "centre_patch_indices",
    "export_monai_vit_state_dict",
    "masked_patch_loss",
]
