"""Held-out masked-reconstruction loss with fixed masks: the SSL objective itself, as a forgetting measure.

Stage training re-initialises the decoder at every stage (MedCoSS), so after a later stage the model's own decoder
head for an earlier modality is untrained. Two measures exist, both on held-out images with masks fixed per
modality (the same for every model and method):

- `own_decoder_loss` (primary, "recon"): the current encoder with the decoder co-trained on that modality (saved
  with the modality's own stage). It is the modality's SSL loss as pre-trained, and rises as the shared encoder
  moves away from what that modality's training built. Feature distillation and EWC act against exactly this
  movement, so read it together with the probes.
- `decoder_probe_loss` (secondary, "recon_refit"): a freshly initialised decoder fitted for a fixed budget on the
  frozen encoder. It measures the information the encoder keeps; a random encoder keeps most of it (random
  features are near-invertible), so at small budgets it barely separates trained from random encoders.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from invcoss_core.evaluation.probes import stride_indices
from invcoss_core.models import MultiModalMAE
from invcoss_core.seeding import derive_seed
from invcoss_core.training.schedule import lr_at


class ReconSettings(BaseModel):
    """Budget of the decoder probe and size of the evaluation sets; one setting for every method."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mask_seed: int = 20240611  # fixes the evaluation masks of every modality
    decoder_seed: int = 7  # fixes the decoder probe's initialisation and batch order
    max_train: int = Field(1024, gt=0)  # training images the decoder probe sees (deterministic stride)
    max_test: int = Field(512, gt=0)  # held-out images scored
    masks_per_image: int = Field(2, gt=0)  # fixed masks per training image for the decoder probe
    decoder_steps: int = Field(150, ge=0)  # decoder-probe budget; 0 skips the (costly) decoder probe
    decoder_batch: int = Field(128, gt=0)
    decoder_lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(256, gt=0)  # evaluation batch


@dataclass(frozen=True)
class ReconScore:
    """Held-out masked-reconstruction loss (normalised-pixel MSE on hidden patches) of one modality."""

    loss: float
    n_test: int
    decoder_final_train_loss: float | None = None  # decoder probe only: its last training batch loss


def fixed_noise(model: MultiModalMAE, modality: str, n: int, seed: int, salt: str = "test") -> torch.Tensor:
    """The (n, L) masking noise of the evaluation: a function of (seed, modality, salt) only."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "recon-mask", modality, salt))
    return model.masking_noise(n, modality, generator, torch.device("cpu"))


@torch.no_grad()
def masked_recon_loss(
    model: MultiModalMAE,
    images: torch.Tensor,
    modality: str,
    noise: torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> float:
    """Mean loss over all hidden patches of `images` under the given masks, with the model's own decoder.

    Args:
        images: (N, C, *img_size) in [0, 1]; noise: (N, L) from `fixed_noise`.
    Returns:
        the loss averaged over hidden patches (equal to `MultiModalMAE.forward_loss` on one big batch).
    """
    model.eval()
    total = 0.0
    count = 0.0
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size].to(device)
        out = model(x, modality, noise=noise[i : i + batch_size].to(device))
        hidden = float(out.mask.sum())
        total += float(out.loss) * hidden
        count += hidden
    return total / max(count, 1.0)


@dataclass(frozen=True)
class _Latents:
    latent: torch.Tensor  # (K, 1 + L_keep, D)
    ids_restore: torch.Tensor  # (K, L)
    mask: torch.Tensor  # (K, L)


@torch.no_grad()
def _encode_fixed(
    model: MultiModalMAE,
    images: torch.Tensor,
    modality: str,
    noise: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> _Latents:
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for i in range(0, images.shape[0], batch_size):
        enc = model.forward_encoder(images[i : i + batch_size].to(device), modality, noise=noise[i : i + batch_size])
        parts.append((enc.latent.cpu(), enc.ids_restore.cpu(), enc.mask.cpu()))
    return _Latents(
        latent=torch.cat([p[0] for p in parts]),
        ids_restore=torch.cat([p[1] for p in parts]),
        mask=torch.cat([p[2] for p in parts]),
    )


def decoder_probe_loss(
    model: MultiModalMAE,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    modality: str,
    settings: ReconSettings,
    device: torch.device | str = "cpu",
) -> ReconScore:
    """Held-out masked-reconstruction loss of a fresh decoder fitted on the frozen encoder's outputs.

    The encoder runs once per (training image, fixed mask); only the decoder is optimised (AdamW, warm-up +
    cosine, fixed seed), so the cost is a few seconds and the result depends on the encoder alone.

    Args:
        model: the model to evaluate (left unchanged).
        train_images: (N, C, *img_size) images of `modality` to fit the decoder on (the site's training split).
        test_images: (M, C, *img_size) held-out images of `modality`.
    Returns:
        ReconScore with the held-out loss under the fixed evaluation masks.
    """
    device = torch.device(device)
    probe = copy.deepcopy(model).to(device).eval()
    probe.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(settings.decoder_seed, "decoder-probe", modality))
        probe.decoder.reset_parameters()
    probe.decoder.requires_grad_(True)
    train = train_images[stride_indices(train_images.shape[0], settings.max_train)]
    reps = settings.masks_per_image
    noise = torch.cat(
        [fixed_noise(probe, modality, train.shape[0], settings.mask_seed, f"train{r}") for r in range(reps)]
    )
    tiled = train.repeat(reps, *([1] * (train.dim() - 1)))
    cache = _encode_fixed(probe, tiled, modality, noise.to(device), settings.batch_size, device)
    optimizer = torch.optim.AdamW(probe.decoder.parameters(), lr=settings.decoder_lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(derive_seed(settings.decoder_seed, "decoder-batches", modality))
    warmup = settings.decoder_steps // 20
    probe.decoder.train()
    last = float("nan")
    for step in range(settings.decoder_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings.decoder_steps, warmup, settings.decoder_lr, settings.decoder_lr * 0.01)
        idx = torch.randint(
            0, cache.latent.shape[0], (min(settings.decoder_batch, cache.latent.shape[0]),), generator=generator
        )
        pred = probe.forward_decoder(cache.latent[idx].to(device), cache.ids_restore[idx].to(device), modality)
        loss = probe.forward_loss(tiled[idx].to(device), pred, cache.mask[idx].to(device), modality)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        last = float(loss.detach())
    probe.eval()
    test = test_images[stride_indices(test_images.shape[0], settings.max_test)]
    test_noise = fixed_noise(probe, modality, test.shape[0], settings.mask_seed, "test")
    held_out = masked_recon_loss(probe, test, modality, test_noise, settings.batch_size, device)
    return ReconScore(loss=held_out, n_test=int(test.shape[0]), decoder_final_train_loss=last)


def own_decoder_loss(
    model: MultiModalMAE,
    decoder_state: dict[str, torch.Tensor],
    test_images: torch.Tensor,
    modality: str,
    settings: ReconSettings,
    device: torch.device | str = "cpu",
) -> ReconScore:
    """Held-out loss of `model`'s encoder with the decoder co-trained on `modality` (its own stage's decoder).

    Args:
        decoder_state: `decoder.*` state dict entries of the artifact of the stage that trained `modality`
            (keys without the `decoder.` prefix).
        test_images: (M, C, *img_size) held-out images.
    """
    probe = copy.deepcopy(model).to(device).eval()
    probe.decoder.load_state_dict(decoder_state, strict=True)
    test = test_images[stride_indices(test_images.shape[0], settings.max_test)]
    noise = fixed_noise(probe, modality, test.shape[0], settings.mask_seed, "test")
    return ReconScore(
        loss=masked_recon_loss(probe, test, modality, noise, settings.batch_size, device), n_test=int(test.shape[0])
    )


def decoder_state(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder's entries of a full model state dict, prefix removed."""
    return {k[len("decoder.") :]: v for k, v in weights.items() if k.startswith("decoder.")}
