"""Stage training: the one loop, its schedule, checkpoints and replay losses."""

from invcoss_core.training.stage import (
    NonFiniteLossError,
    StageError,
    StageResult,
    load_student,
    prepare_models,
    run_stage,
)

__all__ = [
    "NonFiniteLossError",
    "StageError",
    "StageResult",
    "load_student",
    "prepare_models",
    "run_stage",
]
