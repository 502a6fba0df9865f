"""Tests of the inversion replay strategies through the one stage loop (`run_stage`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from invcoss_core.artifact import MANIFEST, SIGNATURE
from invcoss_core.config import StageConfig, build_config
from invcoss_core.data import TensorImages
from invcoss_core.inversion.synthesize import SynthesisResult, Synthesizer
from invcoss_core.replay import inversion as inversion_replay
from invcoss_core.training import run_stage
from tests.invcoss_core.inversion.conftest import FAST_INVERSION


def _config(strategy: str = "inversion", **inversion: object) -> StageConfig:
    return build_config(
        "tiny",
        {
            "train": {"epochs": 1, "batch_size": 8},
            "replay": {"strategy": strategy},
            "inversion": {**FAST_INVERSION, "num_images": 8, **inversion},
        },
    )


def test_inversion_replay_accumulates_every_earlier_pool(
    tmp_path: Path, ct_data: TensorImages, mri_data: TensorImages, pathology_data: TensorImages
) -> None:
    config = _config()
    incoming = None
    results = []
    for index, (modality, data) in enumerate((("ct", ct_data), ("mri", mri_data), ("pathology", pathology_data))):
        out = tmp_path / f"stage{index + 1}"
        result = run_stage(config=config, modality=modality, train_data=data, incoming=incoming, out_dir=out)
        incoming = result.artifact
        results.append(result)
    second, third = results[1].artifact, results[2].artifact
    # Each stage hands on its 8 images less those its gate dropped (the disguised-copy search may drop a look-alike).
    kept = {}
    for modality, result in zip(("ct", "mri", "pathology"), results):
        gate = result.artifact.manifest.privacy_gate
        assert gate is not None and gate.checked >= 8
        kept[modality] = 8 - gate.dropped
        assert kept[modality] > 0 and result.artifact.manifest.metrics["inversion_images"] == kept[modality]
    assert second.manifest.synthetic == {"ct": kept["ct"], "mri": kept["mri"]}
    assert third.manifest.synthetic == kept
    assert torch.equal(third.synthetic["ct"], results[0].artifact.synthetic["ct"])  # carried on unchanged
    assert torch.equal(third.synthetic["mri"], results[1].artifact.synthetic["mri"])
    assert third.synthetic["pathology"].shape == (kept["pathology"], 3, 16, 16)
    assert third.synthetic["pathology"].dtype == torch.float16
    assert results[1].replay_losses  # stage 2 distilled on the stage-1 pool
    gate = third.manifest.privacy_gate
    assert gate is not None and set(gate.threshold) == {"pixel", "feature", "copy"}
    for name in ("task", "norm", "img", "rep", "total"):
        assert f"inversion_final_{name}" in third.manifest.metrics
    # Previews sit beside the artifact; the artifact directory holds manifest-listed files only.
    assert results[2].previews["pathology"].startswith(b"\x89PNG")
    assert (tmp_path / "stage3.preview-pathology.png").read_bytes() == results[2].previews["pathology"]
    listed = set(third.manifest.files) | {MANIFEST, SIGNATURE}
    assert {p.name for p in (tmp_path / "stage3").iterdir()} <= listed


class _InjectingSynthesizer(Synthesizer):
    """Puts a real training image into the first batch it returns (what a memorising inversion might do)."""

    real_image: torch.Tensor

    def run(self, num_images: int) -> SynthesisResult:
        result = super().run(num_images)
        if self.batches_done > 1:
            return result
        images = result.images.clone()
        images[0] = self.real_image.to(torch.float16)
        features = result.features.clone()
        features[0] = self.model.embed(self.real_image[None], self.modality)[0]
        return SynthesisResult(
            images, features, result.history, result.batch_starts, result.seconds, result.steps, result.method
        )


def test_run_stage_manifest_reports_a_blocked_real_image(
    monkeypatch: pytest.MonkeyPatch, ct_data: TensorImages
) -> None:
    _InjectingSynthesizer.real_image = ct_data[4]
    monkeypatch.setattr(inversion_replay, "Synthesizer", _InjectingSynthesizer)
    result = run_stage(config=_config(), modality="ct", train_data=ct_data)
    gate = result.artifact.manifest.privacy_gate
    assert gate is not None
    assert gate.blocked >= 1 and gate.regenerated >= 1 and gate.checked == 8 + gate.regenerated
    pool = result.artifact.synthetic["ct"].float()
    assert pool.shape[0] == 8 - gate.dropped
    assert not any(torch.allclose(image, ct_data[4], atol=1e-2) for image in pool)
    assert gate.max_similarity["pixel"] <= gate.threshold["pixel"]


def test_pixel_inversion_replay_hands_on_its_pool(ct_data: TensorImages) -> None:
    result = run_stage(config=_config("pixel_inversion"), modality="ct", train_data=ct_data)
    manifest = result.artifact.manifest
    assert manifest.replay == "pixel_inversion"
    assert manifest.synthetic == {"ct": 8 - (manifest.privacy_gate.dropped if manifest.privacy_gate else 0)}
    assert manifest.metrics["inversion_steps"] == 16.0  # one batch of 8 at full iterations
