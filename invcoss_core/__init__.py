"""InvCoSS method core: models, losses, inversion, replay, stage training, data, evaluation, artifacts."""

__version__ = "0.1.0"
