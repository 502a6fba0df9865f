"""Multi-modal MAE: tokenizer shapes, patchify, masking, loss descent, MONAI ViT export."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import ViT

from invcoss_core.config import ModalitySpec, build_config
from invcoss_core.models import ModelInputError, build_model, centre_patch_indices, export_monai_vit_state_dict
from tests.helpers import structured_images


@pytest.fixture
def model_cfg():  # type: ignore[no-untyped-def]
    return build_config("tiny").model


@pytest.mark.parametrize(("modality", "tokens"), [("ct", 64), ("mri", 64), ("pathology", 16), ("xray", 16)])
def test_tokenizer_shapes_2d_and_3d(model_cfg, modality: str, tokens: int) -> None:  # type: ignore[no-untyped-def]
    model = build_model(model_cfg)
    spec = model_cfg.spec(modality)
    x = torch.rand(3, *spec.input_shape)
    assert model.encoder.tokenizers[modality](x).shape == (3, tokens, model_cfg.hidden_size)
    out = model(x, modality)
    keep = round(tokens * (1 - model_cfg.mask_ratio))
    assert out.latent.shape == (3, 1 + keep, model_cfg.hidden_size)
    assert out.pred.shape == (3, tokens, spec.patch_dim)
    assert out.mask.sum(1).tolist() == [tokens - keep] * 3


@pytest.mark.parametrize("modality", ["ct", "pathology"])
def test_patchify_round_trip_is_exact(model_cfg, modality: str) -> None:  # type: ignore[no-untyped-def]
    model = build_model(model_cfg)
    x = torch.rand(2, *model_cfg.spec(modality).input_shape)
    assert torch.equal(model.unpatchify(model.patchify(x, modality), modality), x)


def test_patchify_order_matches_tokenizer_raster(model_cfg) -> None:  # type: ignore[no-untyped-def]
    model = build_model(model_cfg)
    x = torch.zeros(1, 1, 16, 16, 16)
    x[0, 0, 4:8, 0:4, 8:12] = 1.0  # patch at grid position (1, 0, 2)
    patches = model.patchify(x, "ct")
    assert patches.sum(-1).nonzero().flatten().tolist() == [0, 1 * 16 + 0 * 4 + 2]


def test_same_noise_gives_same_mask(model_cfg) -> None:  # type: ignore[no-untyped-def]
    model = build_model(model_cfg)
    x = torch.rand(4, 1, 16, 16, 16)
    g = torch.Generator().manual_seed(0)
    noise = model.masking_noise(4, "ct", g, torch.device("cpu"))
    a = model.forward_encoder(x, "ct", noise=noise)
    b = model.forward_encoder(x, "ct", noise=noise)
    assert torch.equal(a.mask, b.mask) and torch.allclose(a.latent, b.latent)


@pytest.mark.parametrize("modality", ["ct", "pathology"])
def test_mae_loss_falls_over_30_steps(model_cfg, modality: str) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = build_model(model_cfg)
    spec = model_cfg.spec(modality)
    x = structured_images(8, spec.input_shape, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    noise = model.masking_noise(8, modality, g, torch.device("cpu"))  # fixed batch, fixed mask
    losses = []
    for _ in range(30):
        loss = model(x, modality, noise=noise).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses
    assert sum(losses[-5:]) < sum(losses[:5]), losses


def test_loss_has_gradients_for_tokenizer_and_blocks(model_cfg) -> None:  # type: ignore[no-untyped-def]
    model = build_model(model_cfg)
    model(torch.rand(2, 1, 16, 16, 16), "ct").loss.backward()
    assert model.encoder.tokenizers["ct"].patch_embeddings.weight.grad is not None
    assert model.encoder.tokenizers["mri"].patch_embeddings.weight.grad is None
    assert all(p.grad is not None for p in model.encoder.blocks[0].attn.qkv.parameters())


def test_wrong_shape_is_refused_with_expected_shape(model_cfg) -> None:  # type: ignore[no-untyped-def]
    model = build_model(model_cfg)
    with pytest.raises(ModelInputError, match=r"\(B, 1, 16, 16, 16\)"):
        model(torch.rand(2, 1, 16, 16), "ct")
    with pytest.raises(ModelInputError):
        model(torch.rand(2, 1, 16, 16), "pathology")  # pathology is RGB


def test_unknown_modality_is_refused(model_cfg) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="unknown modality"):
        build_model(model_cfg)(torch.rand(1, 1, 16, 16), "ultrasound")


def test_embed_is_deterministic_mean_feature(model_cfg) -> None:  # type: ignore[no-untyped-def]
    model = build_model(model_cfg).eval()
    x = torch.rand(3, 3, 16, 16)
    a, b = model.embed(x, "pathology"), model.embed(x, "pathology")
    assert a.shape == (3, model_cfg.hidden_size) and torch.equal(a, b)


@pytest.mark.parametrize(
    ("img_size", "patch_size", "expected"),
    [
        ((16, 16, 16), (4, 4, 4), [21, 22, 25, 26, 37, 38, 41, 42]),  # 4x4x4 grid: the inner 2x2x2 cube
        ((12, 16), (4, 4), [5, 6]),  # 3x4 grid: middle row, two middle columns
        ((20, 20), (4, 4), [12]),  # 5x5 grid: the one middle patch
        ((4, 4), (4, 4), [0]),
    ],
)
def test_centre_patch_indices_hand_computed(img_size, patch_size, expected) -> None:  # type: ignore[no-untyped-def]
    spec = ModalitySpec(spatial_dims=len(img_size), in_channels=1, img_size=img_size, patch_size=patch_size)
    assert centre_patch_indices(spec) == expected


@pytest.mark.parametrize("modality", ["ct", "pathology"])
def test_centre_patches_are_those_holding_the_centre_pixels(model_cfg, modality: str) -> None:  # type: ignore[no-untyped-def]
    model = build_model(model_cfg)
    spec = model_cfg.spec(modality)
    x = torch.zeros(1, *spec.input_shape)
    # The pixels on either side of the centre along every axis (the centre of an even size lies between two).
    middle = [[s // 2 - 1, s // 2] if s % 2 == 0 else [s // 2] for s in spec.img_size]
    index = torch.cartesian_prod(*[torch.tensor(m) for m in middle]).reshape(-1, spec.spatial_dims)
    x[(0, slice(None), *index.T)] = 1.0
    touched = torch.nonzero(model.patchify(x, modality)[0].abs().sum(1))[:, 0].tolist()
    assert touched == centre_patch_indices(spec)


def test_embed_mean_centre_is_the_mean_then_the_centre_tokens(model_cfg) -> None:  # type: ignore[no-untyped-def]
    model = build_model(model_cfg).eval()
    x = torch.rand(3, *model_cfg.spec("ct").input_shape)
    with torch.no_grad():
        tokens = model.forward_encoder(x, "ct", mask_ratio=0.0).latent[:, 1:]
        both = model.embed(x, "ct", "mean_centre")
    d = model_cfg.hidden_size
    assert both.shape == (3, 2 * d)
    torch.testing.assert_close(both[:, :d], model.embed(x, "ct"))
    torch.testing.assert_close(both[:, d:], tokens[:, [21, 22, 25, 26, 37, 38, 41, 42]].mean(1))
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        model.embed(x, "ct", "max")


@pytest.mark.parametrize("modality", ["ct", "pathology"])
def test_export_loads_strictly_into_monai_vit(model_cfg, modality: str) -> None:  # type: ignore[no-untyped-def]
    model = build_model(model_cfg).eval()
    spec = model_cfg.spec(modality)
    kwargs = dict(
        in_channels=spec.in_channels,
        img_size=spec.img_size,
        patch_size=spec.patch_size,
        hidden_size=model_cfg.hidden_size,
        mlp_dim=model_cfg.mlp_dim,
        num_layers=model_cfg.num_layers,
        num_heads=model_cfg.num_heads,
        spatial_dims=spec.spatial_dims,
    )
    vit = ViT(**kwargs, classification=False).eval()
    vit.load_state_dict(export_monai_vit_state_dict(model, modality), strict=True)
    # With the CLS token the ViT computes exactly our encoder.
    vit_cls = ViT(**kwargs, classification=True).eval()
    state = export_monai_vit_state_dict(model, modality, classification=True)
    missing = vit_cls.load_state_dict(state, strict=False)
    assert missing.unexpected_keys == [] and all(k.startswith("classification_head") for k in missing.missing_keys)
    x = torch.rand(2, *spec.input_shape)
    with torch.no_grad():
        h = torch.cat([vit_cls.cls_token.expand(2, -1, -1), vit_cls.patch_embedding(x)], 1)
        for blk in vit_cls.blocks:
            h = blk(h)
        ours = model.forward_encoder(x, modality, mask_ratio=0.0).latent
    torch.testing.assert_close(vit_cls.norm(h), ours, atol=1e-5, rtol=1e-5)
