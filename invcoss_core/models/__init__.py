"""Model definitions: the multi-modal MAE backbone and its factory."""

from invcoss_core.models.mae import (
    EncoderOutput,
    MAEOutput,
    ModelInputError,
    MultiModalMAE,
    build_model,
    export_monai_vit_state_dict,
    masked_patch_loss,
)

__all__ = [
    "EncoderOutput",
    "MAEOutput",
    "ModelInputError",
    "MultiModalMAE",
    "build_model",
    "export_monai_vit_state_dict",
    "masked_patch_loss",
]
