"""Multi-modal masked autoencoder: per-modality tokenizers, one shared ViT encoder, one shared decoder."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock
from torch import nn

from invcoss_core.config import ModalitySpec, ModelConfig

POOLINGS = ("mean", "mean_centre")  # see `MultiModalMAE.embed`


def centre_patch_indices(spec: ModalitySpec) -> list[int]:
    """Row-major token indices of the patches that touch the centre of the input.

    Per axis the middle patch of an odd grid, the two middle patches of an even one (the centre lies on their
    border): 1, 2, 4 or 8 patches in all.
    """
    grid = [s // p for s, p in zip(spec.img_size, spec.patch_size)]
    per_axis = [[g // 2] if g % 2 else [g // 2 - 1, g // 2] for g in grid]
    indices = []
    for position in itertools.product(*per_axis):
        flat = 0
        for axis, value in enumerate(position):
            flat = flat * grid[axis] + value
        indices.append(flat)
    return indices


class ModelInputError(ValueError):
    """A tensor handed to the model has the wrong modality, shape or values."""


@dataclass(frozen=True)
class EncoderOutput:
    """What `forward_encoder` returns.

    latent: (B, 1 + L_visible, D) encoder tokens after the final norm, CLS first.
    mask: (B, L) 1 where a patch was hidden, 0 where it was visible.
    ids_restore: (B, L) permutation that undoes the shuffle of `random_masking`.
    """

    latent: torch.Tensor
    mask: torch.Tensor
    ids_restore: torch.Tensor


@dataclass(frozen=True)
class MAEOutput:
    """What a full MAE forward pass returns: loss (scalar), pred (B, L, patch_dim), mask (B, L), latent."""

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    latent: torch.Tensor


def masked_patch_loss(
    pred: torch.Tensor, target_patches: torch.Tensor, mask: torch.Tensor, norm_pix: bool
) -> torch.Tensor:
    """The MAE objective: mean squared error on the hidden patches only.

    Args:
        pred: (B, L, P) decoder predictions for every patch.
        target_patches: (B, L, P) the images' patches (`MultiModalMAE.patchify`).
        mask: (B, L) 1 where a patch was hidden from the encoder.
        norm_pix: normalise each target patch by its own mean and variance (MAE's norm_pix_loss).
    Returns:
        scalar float32 loss (0 when nothing was hidden).
    """
    target = target_patches.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # (B, L)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def _transformer_blocks(width: int, depth: int, heads: int, mlp: int) -> nn.ModuleList:
    # qkv_bias=False keeps keys identical to monai.networks.nets.ViT's defaults (strict export).
    return nn.ModuleList(
        TransformerBlock(width, mlp, heads, dropout_rate=0.0, qkv_bias=False, use_flash_attention=True)
        for _ in range(depth)
    )


class MAEEncoder(nn.Module):
    """Shared ViT encoder with one MONAI PatchEmbeddingBlock per modality.

    Keys are laid out so that `tokenizers.<m>.*`, `blocks.*`, `norm.*` and `cls_token` map one-to-one onto
    `monai.networks.nets.ViT` (`patch_embedding.*`, `blocks.*`, `norm.*`, `cls_token`).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.tokenizers = nn.ModuleDict(
            {
                name: PatchEmbeddingBlock(
                    in_channels=spec.in_channels,
                    img_size=spec.img_size,
                    patch_size=spec.patch_size,
                    hidden_size=cfg.hidden_size,
                    num_heads=cfg.num_heads,
                    proj_type="conv",
                    pos_embed_type="learnable",
                    dropout_rate=0.0,
                    spatial_dims=spec.spatial_dims,
                )
                for name, spec in cfg.modalities.items()
            }
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.blocks = _transformer_blocks(cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_dim)
        self.norm = nn.LayerNorm(cfg.hidden_size)


class MAEDecoder(nn.Module):
    """Shared MAE decoder; per-modality position embeddings and prediction heads."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        width = cfg.decoder_hidden_size
        self.embed = nn.Linear(cfg.hidden_size, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(1, 1 + spec.num_patches, width)) for name, spec in cfg.modalities.items()}
        )
        self.blocks = _transformer_blocks(width, cfg.decoder_layers, cfg.decoder_heads, cfg.decoder_mlp_dim)
        self.norm = nn.LayerNorm(width)
        self.heads = nn.ModuleDict({name: nn.Linear(width, spec.patch_dim) for name, spec in cfg.modalities.items()})

    def reset_parameters(self) -> None:
        """Re-initialise every decoder weight (MedCoSS starts each stage with a fresh decoder)."""
        for module in self.modules():
            _init_module(module)
        nn.init.normal_(self.mask_token, std=0.02)
        for param in self.pos_embed.values():
            nn.init.trunc_normal_(param, std=0.02)


def _init_module(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MultiModalMAE(nn.Module):
    """MedCoSS-style multi-modal MAE (He et al. 2022 masking, normalised-pixel MSE on hidden patches)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = MAEEncoder(cfg)
        self.decoder = MAEDecoder(cfg)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        for module in self.modules():
            _init_module(module)
        for tokenizer in self.encoder.tokenizers.values():
            assert isinstance(tokenizer, PatchEmbeddingBlock)
            # MAE initialises the patch projection like a Linear layer over the flattened patch.
            weight = tokenizer.patch_embeddings.weight
            assert isinstance(weight, torch.Tensor)
            nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
            nn.init.trunc_normal_(tokenizer.position_embeddings, std=0.02)
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        self.decoder.reset_parameters()

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are (one device: the model is moved whole)."""
        return next(self.parameters()).device

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities this model has a tokenizer for."""
        return tuple(self.cfg.modalities)

    def spec(self, modality: str) -> ModalitySpec:
        """The tokenizer spec of `modality`; raises ConfigError for an unknown one."""
        return self.cfg.spec(modality)

    def check_input(self, x: torch.Tensor, modality: str) -> None:
        """Refuse a batch whose shape does not fit the modality's tokenizer.

        Raises:
            ModelInputError: with the expected and received shape.
        """
        spec = self.spec(modality)
        if x.dim() != spec.spatial_dims + 2 or tuple(x.shape[1:]) != spec.input_shape:
            raise ModelInputError(
                f"{modality} batch must have shape (B, {', '.join(map(str, spec.input_shape))}); got {tuple(x.shape)}"
            )

    # --- the algorithm's steps -------------------------------------------------------------------------------

    def patchify(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """Cut images into flattened patches.

        Args:
            x: (B, C, *img_size) images.
        Returns:
            (B, L, prod(patch_size) * C) patches in the tokenizer's raster order, channels last.
        """
        spec = self.spec(modality)
        b, c = x.shape[:2]
        grid = [s // p for s, p in zip(spec.img_size, spec.patch_size)]
        # (B, C, g1, p1, g2, p2[, g3, p3]) -> (B, g1, g2[, g3], p1, p2[, p3], C)
        shape = [b, c]
        for g, p in zip(grid, spec.patch_size):
            shape += [g, p]
        x = x.reshape(shape)
        n = spec.spatial_dims
        grid_axes = [2 + 2 * i for i in range(n)]
        patch_axes = [3 + 2 * i for i in range(n)]
        x = x.permute(0, *grid_axes, *patch_axes, 1)
        return x.reshape(b, math.prod(grid), math.prod(spec.patch_size) * c)

    def unpatchify(self, patches: torch.Tensor, modality: str) -> torch.Tensor:
        """Inverse of `patchify`: (B, L, patch_dim) -> (B, C, *img_size)."""
        spec = self.spec(modality)
        b = patches.shape[0]
        c = spec.in_channels
        grid = [s // p for s, p in zip(spec.img_size, spec.patch_size)]
        n = spec.spatial_dims
        x = patches.reshape(b, *grid, *spec.patch_size, c)
        # (B, g..., p..., C) -> (B, C, g1, p1, g2, p2, ...)
        order = [0, 2 * n + 1]
        for i in range(n):
            order += [1 + i, 1 + n + i]
        x = x.permute(*order)
        return x.reshape(b, c, *spec.img_size)

    def random_masking(
        self, tokens: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random subset of tokens per sample (argsort of uniform noise).

        Args:
            tokens: (B, L, D) patch tokens with position embeddings.
            mask_ratio: share of tokens hidden, in [0, 1).
            noise: (B, L) uniform noise; pass the same noise to two models to give them the same mask.
        Returns:
            visible (B, L_keep, D), mask (B, L) with 1 = hidden, ids_restore (B, L).
        """
        b, length, dim = tokens.shape
        keep = max(1, round(length * (1 - mask_ratio)))
        if noise is None:
            noise = torch.rand(b, length, device=tokens.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(b, length, device=tokens.device, dtype=tokens.dtype)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return visible, mask, ids_restore

    def forward_encoder(
        self,
        x: torch.Tensor,
        modality: str,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Tokenize, mask, prepend CLS and run the shared blocks.

        Args:
            x: (B, C, *img_size) images of `modality`.
            mask_ratio: share hidden; None uses the config's ratio, 0.0 keeps every token.
            noise: optional (B, L) masking noise (see `random_masking`).
        Returns:
            EncoderOutput with latent (B, 1 + L_keep, D).
        """
        self.check_input(x, modality)
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        tokens = self.encoder.tokenizers[modality](x)  # (B, L, D), position embeddings added
        if ratio > 0:
            tokens, mask, ids_restore = self.random_masking(tokens, ratio, noise)
        else:
            b, length = tokens.shape[:2]
            mask = torch.zeros(b, length, device=x.device, dtype=tokens.dtype)
            ids_restore = torch.arange(length, device=x.device).expand(b, -1)
        cls = self.encoder.cls_token.expand(tokens.shape[0], -1, -1)
        hidden = torch.cat([cls, tokens], dim=1)
        for block in self.encoder.blocks:
            hidden = block(hidden)
        return EncoderOutput(latent=self.encoder.norm(hidden), mask=mask, ids_restore=ids_restore)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor, modality: str) -> torch.Tensor:
        """Re-insert mask tokens in their places and predict every patch.

        Args:
            latent: (B, 1 + L_keep, D) encoder output.
            ids_restore: (B, L) from the encoder's masking.
        Returns:
            (B, L, patch_dim) predictions.
        """
        dec = self.decoder
        h = dec.embed(latent)
        b, length = ids_restore.shape
        n_mask = length + 1 - h.shape[1]
        patches = torch.cat([h[:, 1:], dec.mask_token.expand(b, n_mask, -1)], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, h.shape[2]))
        h = torch.cat([h[:, :1], patches], dim=1) + dec.pos_embed[modality]
        for block in dec.blocks:
            h = block(h)
        return dec.heads[modality](dec.norm(h)[:, 1:])

    def forward_loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, modality: str) -> torch.Tensor:
        """Mean squared error on hidden patches, against per-patch normalised pixels when configured.

        Args:
            x: (B, C, *img_size) the images; pred: (B, L, patch_dim); mask: (B, L), 1 = hidden.
        Returns:
            scalar loss (float32).
        """
        return masked_patch_loss(pred, self.patchify(x, modality), mask, self.cfg.norm_pix_loss)

    def forward(
        self,
        x: torch.Tensor,
        modality: str,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
    ) -> MAEOutput:
        """Full MAE pass: encoder on visible patches, decoder on all, loss on the hidden ones."""
        enc = self.forward_encoder(x, modality, mask_ratio, noise)
        pred = self.forward_decoder(enc.latent, enc.ids_restore, modality)
        loss = self.forward_loss(x, pred, enc.mask, modality)
        return MAEOutput(loss=loss, pred=pred, mask=enc.mask, latent=enc.latent)

    @torch.no_grad()
    def embed(self, x: torch.Tensor, modality: str, pooling: str = "mean") -> torch.Tensor:
        """Frozen-encoder features with nothing masked.

        Args:
            x: (B, C, *img_size).
            pooling: "mean" — the mean of the patch tokens, (B, D); "mean_centre" — that mean followed by the mean
                of the tokens of the patches that touch the image centre (`centre_patch_indices`), (B, 2·D), for
                tasks labelled by the centre voxel, whose class a mean over the whole input dilutes.
        Returns:
            (B, D) or (B, 2·D) float32 features.
        """
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        tokens = self.forward_encoder(x, modality, mask_ratio=0.0).latent[:, 1:]
        mean = tokens.mean(dim=1)
        if pooling == "mean":
            return mean.float()
        centre = tokens[:, centre_patch_indices(self.spec(modality))].mean(dim=1)
        return torch.cat([mean, centre], dim=1).float()

    def masking_noise(
        self, batch: int, modality: str, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        """Uniform (B, L) noise for `random_masking`, drawn from `generator` (reproducible masks)."""
        length = self.spec(modality).num_patches
        return torch.rand(batch, length, generator=generator, device=generator.device if generator else None).to(device)


def export_monai_vit_state_dict(
    model: MultiModalMAE, modality: str, classification: bool = False
) -> dict[str, torch.Tensor]:
    """The encoder of one modality as a `monai.networks.nets.ViT` state dict (strict-loadable).

    Args:
        model: a trained MultiModalMAE.
        modality: whose tokenizer becomes ViT's `patch_embedding`.
        classification: include `cls_token` (ViT with classification=True; its head stays untrained).
    Returns:
        state dict keyed like monai.networks.nets.ViT / UNETR's `vit`.
    """
    model.spec(modality)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.encoder.state_dict().items():
        if key.startswith("tokenizers."):
            name, rest = key[len("tokenizers.") :].split(".", 1)
            if name == modality:
                out[f"patch_embedding.{rest}"] = value.clone()
        elif key == "cls_token":
            if classification:
                out["cls_token"] = value.clone()
        else:
            out[key] = value.clone()
    return out


def build_model(cfg: ModelConfig) -> MultiModalMAE:
    """The one model factory used by the trainer, the inversion, the bench and the sites."""
    return MultiModalMAE(cfg)
