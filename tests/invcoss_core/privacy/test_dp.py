"""DP-SGD at the site: per-sample gradients are exact, clipped and noised as specified, the accountant's ε is
Opacus's, a DP stage records its guarantee in the signed manifest, and DP training defeats the audit's positive
control (a model that memorised three images)."""

from __future__ import annotations

import math

import pytest
import torch

from invcoss_core.config import ConfigError, build_config
from invcoss_core.data import TensorImages
from invcoss_core.models import build_model
from invcoss_core.privacy import PrivacyReport, privacy_line
from invcoss_core.privacy.dp import DPStep, PoissonBatches, epsilon, used_parameters
from invcoss_core.training import run_stage
from tests.helpers import structured_images
from tests.invcoss_core.privacy.test_audit import _audited_stage


def _model_and_batch(batch: int = 6) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(build_config("tiny").model)
    x = torch.rand(batch, 1, 16, 16, 16)
    noise = model.masking_noise(batch, "ct", torch.Generator().manual_seed(1), torch.device("cpu"))
    return model, x, noise


def _step(model: torch.nn.Module, max_grad_norm: float, noise_multiplier: float, expected: float) -> DPStep:
    return DPStep(
        model=model,  # type: ignore[arg-type]
        modality="ct",
        max_grad_norm=max_grad_norm,
        noise_multiplier=noise_multiplier,
        expected_batch=expected,
        noise_generator=torch.Generator().manual_seed(2),
        microbatch=4,  # 6 samples: two chunks, one of them short
    )


def test_unclipped_noiseless_dp_gradient_is_the_batch_gradient() -> None:
    model, x, noise = _model_and_batch()
    model.zero_grad()
    model(x, "ct", noise=noise).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    step = _step(model, max_grad_norm=1e6, noise_multiplier=1e-12, expected=6.0)
    loss = step(x, noise)
    assert set(step.names) == set(reference)
    for name, grad in reference.items():
        got = dict(model.named_parameters())[name].grad
        assert got is not None
        torch.testing.assert_close(got, grad, rtol=1e-4, atol=1e-6)
    assert loss.item() == pytest.approx(model(x, "ct", noise=noise).loss.item(), rel=1e-5)


def test_each_sample_is_clipped_to_max_grad_norm() -> None:
    model, x, noise = _model_and_batch()
    clip = 1e-3  # far below every per-sample gradient's norm: each sample contributes exactly `clip`
    step = _step(model, max_grad_norm=clip, noise_multiplier=1e-12, expected=1.0)
    step(x, noise)
    total = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if n in step.names]).norm()
    assert total.item() <= 6 * clip * (1 + 1e-4)
    assert total.item() > clip  # the sum of six clipped gradients, not zero
    one = _step(model, max_grad_norm=clip, noise_multiplier=1e-12, expected=1.0)
    one(x[:1], noise[:1])
    single = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if n in one.names]).norm()
    assert single.item() == pytest.approx(clip, rel=1e-3)


def test_an_empty_batch_gives_noise_of_the_stated_scale_on_used_parameters_only() -> None:
    model, _, _ = _model_and_batch()
    step = _step(model, max_grad_norm=2.0, noise_multiplier=1.5, expected=10.0)
    loss = step(None, None)
    assert loss.item() == 0.0
    params = dict(model.named_parameters())
    noise = torch.cat([params[n].grad.flatten() for n in step.names])
    assert noise.numel() > 10_000
    assert noise.std().item() == pytest.approx(1.5 * 2.0 / 10.0, rel=0.05)
    unused = [n for n in params if n not in step.names]
    assert unused and all(params[n].grad is None for n in unused)  # other modalities' heads: no noise
    assert any(n.startswith("encoder.") for n in step.names) and not any("mri" in n for n in step.names)


def test_used_parameters_do_not_depend_on_the_data() -> None:
    model, _, _ = _model_and_batch()
    a = used_parameters(model, "ct", torch.Generator().manual_seed(0))  # type: ignore[arg-type]
    b = used_parameters(model, "ct", torch.Generator().manual_seed(99))  # type: ignore[arg-type]
    assert a == b


def test_poisson_batches_have_the_expected_size() -> None:
    batches = list(PoissonBatches(1000, 0.05, 200, torch.Generator().manual_seed(0)))
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert len(batches) == 200
    assert sizes.mean().item() == pytest.approx(50, rel=0.05)
    assert sizes.std().item() > 3  # the size varies: sampled, not fixed
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonBatches(10, 0.0, 1, torch.Generator())


def test_epsilon_is_opacus_rdp_and_falls_with_noise() -> None:
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=0.01, noise_multiplier=1.0, steps=1000, orders=orders)
    expected, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert epsilon(1.0, 0.01, 1000, 1e-5) == pytest.approx(expected, rel=1e-6)
    values = [epsilon(sigma, 0.01, 1000, 1e-5) for sigma in (0.6, 1.0, 2.0)]
    assert values[0] > values[1] > values[2] > 0 and all(math.isfinite(v) for v in values)
    with pytest.raises(ValueError, match="noise"):
        epsilon(0.0, 0.01, 10, 1e-5)


def test_dp_config_is_validated_with_the_key_named() -> None:
    with pytest.raises(ConfigError, match="dp_noise_multiplier"):
        build_config("tiny", {"privacy": {"dp_noise_multiplier": 0}})  # no noise: no guarantee
    with pytest.raises(ConfigError, match="devices = 1"):
        build_config("tiny", {"devices": 2, "train": {"batch_size": 8}, "privacy": {"dp_noise_multiplier": 1.0}})


def test_a_dp_stage_records_its_guarantee_in_the_signed_manifest() -> None:
    config = build_config(
        "tiny",
        {
            "train": {"epochs": 2, "steps_per_epoch": 3, "batch_size": 8},
            "privacy": {"dp_noise_multiplier": 1.1, "dp_max_grad_norm": 0.5, "dp_delta": 1e-4},
        },
    )
    images = structured_images(40, (1, 16, 16), seed=3, kind="stripes")
    result = run_stage(config=config, modality="xray", train_data=TensorImages(images))
    privacy = result.artifact.manifest.privacy  # parsed back from the encoded manifest
    assert privacy is not None and privacy.dp is not None
    assert not privacy.measured and privacy.decision == "not_measured" and "no audit" in privacy.reason
    dp = privacy.dp
    assert (dp.noise_multiplier, dp.max_grad_norm, dp.delta) == (1.1, 0.5, 1e-4)
    assert dp.steps == 6 and dp.sample_rate == pytest.approx(8 / 40)
    assert dp.epsilon == pytest.approx(epsilon(1.1, 8 / 40, 6, 1e-4))
    assert "weights only" in dp.scope and dp.accountant == "opacus-rdp"
    assert all(math.isfinite(v) for v in result.epoch_losses)
    assert privacy_line(privacy).startswith("not measured (no audit") and "DP-SGD epsilon" in privacy_line(privacy)


@pytest.fixture(scope="module")
def memorising_with_dp() -> PrivacyReport:
    # The audit's positive control (3 images, 150 steps: calibrated AUC ≥ 0.9 without DP, test_audit.py), now
    # trained with DP-SGD at noise multiplier 1.0.
    return _audited_stage(n_train=3, n_audit=24, steps=150, seed=5, dp_noise_multiplier=1.0)


def test_dp_training_defeats_the_memorising_control(memorising_with_dp: PrivacyReport) -> None:
    report = memorising_with_dp
    assert report.measured and report.calibrated_loss is not None and report.dp is not None
    assert report.calibrated_loss.auc < 0.75  # without DP the same stage gives ≥ 0.9
    assert report.dp.sample_rate == 1.0 and report.dp.steps == 150  # 3 samples, batch 3: every step sees all
    assert f"DP-SGD epsilon {report.dp.epsilon:.2f}" in privacy_line(report)
