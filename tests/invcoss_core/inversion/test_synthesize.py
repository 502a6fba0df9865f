"""Tests of the synthesis loop (InvUNet and pixel-space) on tiny trained models."""

from __future__ import annotations

import pytest
import torch

from invcoss_core.common.events import ProgressEvent
from invcoss_core.inversion.preview import preview_png
from invcoss_core.inversion.synthesize import (
    Synthesizer,
    images_needed,
    mean_pairwise_cosine,
    pixel_inversion,
    synthesize,
)
from tests.invcoss_core.inversion.conftest import Trained


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_synthesize_gives_finite_float16_images_of_the_tokenizer_shape(trained: Trained) -> None:
    result = synthesize(trained.model, trained.modality, trained.stats, 10, trained.inversion(), generator=_generator())
    spec = trained.model.spec(trained.modality)
    assert result.images.shape == (10, *spec.input_shape)
    assert result.images.dtype == torch.float16
    assert bool(torch.isfinite(result.images).all())
    assert float(result.images.min()) >= 0.0 and float(result.images.max()) <= 1.0
    assert result.features.shape == (10, trained.model.cfg.hidden_size)
    assert result.batch_starts == [0, 16]  # batches of 8 then 2; the second, warm one runs 6 steps
    assert result.steps == 16 + 6 and all(len(v) == result.steps for v in result.history.values())
    assert set(result.final) == {"task", "norm", "img", "rep", "total"}


def test_synthesize_lowers_the_inversion_loss(trained: Trained) -> None:
    config = trained.inversion(iterations=30, num_images=8)
    result = synthesize(trained.model, trained.modality, trained.stats, 8, config, generator=_generator(1))
    total = result.history["total"]
    assert sum(total[-3:]) / 3 < sum(total[:3]) / 3
    assert result.history["rep"][0] == 0.0  # empty pool in the first batch


def test_synthesize_leaves_the_model_untouched(trained_2d: Trained) -> None:
    model = trained_2d.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    synthesize(model, "xray", trained_2d.stats, 4, trained_2d.inversion(), generator=_generator())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_synthesize_is_reproducible_from_the_generator(trained_2d: Trained) -> None:
    config = trained_2d.inversion(iterations=4, iterations_per_batch=2)
    a = synthesize(trained_2d.model, "xray", trained_2d.stats, 4, config, generator=_generator(5))
    b = synthesize(trained_2d.model, "xray", trained_2d.stats, 4, config, generator=_generator(5))
    assert torch.equal(a.images, b.images)


def test_synthesize_repulsion_lowers_pairwise_feature_cosine(trained_2d: Trained) -> None:
    # Mean-pooled features of these tiny models are nearly parallel (cosines ≥ 0.998), so L_rep pushes gently:
    # the default α_rep = 0.1 moves the cosine in the 5th decimal; α_rep = 10 moves it consistently.
    config = trained_2d.inversion(num_images=32, batch_size=8, iterations=20, iterations_per_batch=10)
    cosines = {}
    for alpha in (0.0, 10.0):
        result = synthesize(
            trained_2d.model,
            "xray",
            trained_2d.stats,
            32,
            config.model_copy(update={"alpha_rep": alpha}),
            generator=_generator(0),
        )
        cosines[alpha] = mean_pairwise_cosine(result.features)
    assert cosines[10.0] < cosines[0.0]


def test_pixel_inversion_gives_images_and_runs_full_iterations_every_batch(trained_3d: Trained) -> None:
    result = pixel_inversion(
        trained_3d.model, "ct", trained_3d.stats, 10, trained_3d.inversion(), generator=_generator()
    )
    assert result.method == "pixels"
    assert result.images.shape == (10, 1, 16, 16, 16) and result.images.dtype == torch.float16
    assert result.steps == 2 * 16  # no amortisation without a generator


def test_synthesizer_keeps_the_generator_warm_across_calls(trained_2d: Trained) -> None:
    synth = Synthesizer(trained_2d.model, "xray", trained_2d.stats, trained_2d.inversion(), generator=_generator())
    first = synth.run(8)
    again = synth.run(3)
    assert (first.steps, again.steps) == (16, 6)
    assert synth.pool.shape[0] == 11  # every generated image joined the repulsion pool


def test_synthesize_reports_progress_events(trained_2d: Trained) -> None:
    events: list[ProgressEvent] = []
    synthesize(
        trained_2d.model,
        "xray",
        trained_2d.stats,
        12,
        trained_2d.inversion(),
        generator=_generator(),
        events=events.append,
    )
    assert [e.phase for e in events] == ["inversion", "inversion"]
    assert (events[-1].step, events[-1].total) == (22, 22)
    assert events[-1].metrics["images"] == 12.0 and "norm" in events[-1].metrics


def test_synthesize_rejects_missing_statistics(trained_2d: Trained) -> None:
    with pytest.raises(KeyError, match="pathology"):
        synthesize(trained_2d.model, "pathology", trained_2d.stats, 2, trained_2d.inversion(), generator=_generator())


def test_images_needed_uses_the_fraction_with_a_floor(trained_2d: Trained) -> None:
    config = trained_2d.inversion(num_images=None, image_fraction=0.05, min_images=8)
    assert images_needed(config, 1000) == 50
    assert images_needed(config, 40) == 8
    assert images_needed(trained_2d.inversion(num_images=3), 1000) == 3


@pytest.mark.parametrize("shape", [(5, 1, 16, 16), (3, 3, 16, 16), (4, 1, 8, 16, 16)])
def test_preview_png_renders_a_png(shape: tuple[int, ...]) -> None:
    png = preview_png(torch.rand(shape))
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 500
