"""Probe tasks on a generated label folder: labels agree with the patches, splits keep subjects apart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from invcoss_core.config import StageConfig, build_config
from invcoss_core.data import SiteDataError, list_probe_tasks, load_probe_task
from invcoss_core.data.probes import TASK_DEFINITIONS, hematoxylin_density
from invcoss_core.evaluation.data import load_bench_data
from tests.invcoss_core.data.conftest import spec_of
from tests.invcoss_core.data.factories import ct_phantom, he_tile, mri_phantom, write_nifti, write_png


def _sphere(shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    distance = np.zeros(shape)
    for g, c in zip(grid, centre):
        distance += (g - c) ** 2
    return np.asarray(distance <= radius**2)


@pytest.fixture()
def labelled(tmp_path: Path) -> Path:
    root = tmp_path / "samples"
    items: dict[str, list[dict[str, object]]] = {name: [] for name in TASK_DEFINITIONS}
    for i in range(3):  # MRI with bright tumours
        volume = mri_phantom((40, 40, 40), seed=i)
        tumour = _sphere(volume.shape, (14 + 4 * i, 20, 20), 5)
        volume[tumour] = 2000.0
        write_nifti(root / "mri" / f"m{i}.nii.gz", volume, (1.5, 1.5, 1.5))
        write_nifti(root / "labels" / f"m{i}_mask.nii.gz", tumour.astype(np.uint8), (1.5, 1.5, 1.5))
        item: dict[str, object] = {"image": f"mri/m{i}.nii.gz", "subject": f"m{i}", "mask": f"labels/m{i}_mask.nii.gz"}
        items["mri_tumour"].append(item)
    # One subject with tissue maps: cylinders along the longest axis, so both split regions hold every class.
    shape = (80, 36, 36)
    _, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    radius = np.sqrt((y - 18) ** 2 + (z - 18) ** 2)
    head = np.where(radius < 16, 500.0, 0.0).astype(np.float32) + np.where(radius < 5, 300.0, 0.0)
    head += np.random.default_rng(9).normal(0, 10, shape).astype(np.float32) * (radius < 16)
    write_nifti(root / "mri" / "atlas.nii.gz", head, (1.5, 1.5, 1.5))
    write_nifti(root / "labels" / "gm.nii.gz", ((radius >= 5) & (radius < 10)).astype(np.uint8) * 255, (1.5,) * 3)
    write_nifti(root / "labels" / "wm.nii.gz", (radius < 5).astype(np.uint8) * 255, (1.5, 1.5, 1.5))
    items["mri_tissue"].append(
        {
            "image": "mri/atlas.nii.gz",
            "subject": "atlas",
            "maps": {"grey_matter": "labels/gm.nii.gz", "white_matter": "labels/wm.nii.gz"},
        }
    )
    for i in range(2):
        write_nifti(root / "ct" / f"c{i}.nii.gz", ct_phantom((48, 48, 24), seed=i), (1.5, 1.5, 3.0))
        items["ct_hu_tissue"].append({"image": f"ct/c{i}.nii.gz", "subject": f"c{i}"})
    for i in range(2):
        write_png(root / "pathology" / f"he{i}.png", he_tile((256, 256), seed=i))
        items["pathology_stain"].append({"image": f"pathology/he{i}.png", "subject": f"he{i}", "label": "he"})
        items["pathology_hematoxylin"].append({"image": f"pathology/he{i}.png", "subject": f"he{i}"})
    ihc = he_tile((256, 256), seed=7)
    ihc[..., 2] = ihc[..., 2] // 3  # brown, not pink
    write_png(root / "pathology" / "ihc.png", ihc)
    items["pathology_stain"].append({"image": "pathology/ihc.png", "subject": "ihc", "label": "ihc"})
    tasks = {name: {**TASK_DEFINITIONS[name], "items": its} for name, its in items.items() if its}
    (root / "labels" / "tasks.json").write_text(json.dumps({"format_version": 1, "tasks": tasks}))
    return root


def test_list_probe_tasks(labelled: Path) -> None:
    infos = {info.name: info for info in list_probe_tasks(labelled)}
    assert set(infos) == {"mri_tumour", "mri_tissue", "ct_hu_tissue", "pathology_stain", "pathology_hematoxylin"}
    assert infos["pathology_stain"].pseudo and not infos["mri_tumour"].pseudo
    assert infos["mri_tumour"].n_images == 3 and infos["ct_hu_tissue"].modality == "ct"


def test_tumour_patches_are_centred_in_the_mask(labelled: Path, tiny: StageConfig) -> None:
    probe = load_probe_task(labelled, "mri_tumour", spec_of(tiny, "mri"), seed=0)
    assert probe.x.shape[1:] == (1, 16, 16, 16) and probe.y.dtype == torch.int64
    tumour = probe.y == probe.classes.index("tumour")
    centre = probe.x[:, 0, 8, 8, 8]
    assert tumour.any() and (~tumour).any()
    assert bool((centre[tumour] > 0.9).all())
    assert float(probe.x[~tumour].amax(dim=(1, 2, 3, 4)).max()) < 0.9  # normal patches hold no tumour voxel


def test_subject_level_split_keeps_subjects_apart(labelled: Path, tiny: StageConfig) -> None:
    probe = load_probe_task(labelled, "mri_tumour", spec_of(tiny, "mri"), seed=1)
    assert probe.split_note.startswith("subject-level")
    train = {s for s, t in zip(probe.subjects, probe.train_mask.tolist()) if t}
    test = {s for s, t in zip(probe.subjects, probe.train_mask.tolist()) if not t}
    assert train and test and train.isdisjoint(test)
    for label in range(len(probe.classes)):
        assert (probe.y[probe.train_mask] == label).any() and (probe.y[~probe.train_mask] == label).any()


def test_hu_classes_match_the_centre_voxel(labelled: Path, tiny: StageConfig) -> None:
    probe = load_probe_task(labelled, "ct_hu_tissue", spec_of(tiny, "ct"), seed=0)
    hu = probe.x[:, 0, 8, 8, 8] * 2000 - 1000
    bounds = {"air_lung": (-1e9, -600), "fat": (-150, -50), "soft_tissue": (0, 100), "bone": (300, 1e9)}
    for index, name in enumerate(probe.classes):
        values = hu[probe.y == index]
        if len(values):
            low, high = bounds[name]
            assert float(values.min()) >= low - 1e-2 and float(values.max()) <= high + 1e-2, name
    assert len(set(probe.y.tolist())) >= 3


def test_one_subject_task_splits_by_region(labelled: Path, tiny: StageConfig) -> None:
    probe = load_probe_task(labelled, "mri_tissue", spec_of(tiny, "mri"), seed=0)
    assert probe.split_note.startswith("region-level split (one subject)")
    assert "not on both sides" not in probe.split_note
    assert probe.train_mask.any() and (~probe.train_mask).any()
    assert set(probe.y.tolist()) == {0, 1, 2}


def test_a_task_whose_patches_cannot_fill_both_sides_of_its_split_is_refused_by_name(
    labelled: Path, tiny: StageConfig
) -> None:
    # The atlas is 80 voxels long: 48-voxel patches fit before the 70 % cut but never after it (the base profile's
    # 96³ inputs on the sample data's MNI brain did this, and the bench scored a probe with no test patch).
    big = spec_of(tiny, "mri").model_copy(update={"img_size": (48, 48, 48), "patch_size": (8, 8, 8)})
    with pytest.raises(SiteDataError, match=r"'mri_tissue'.*\(48, 48, 48\).*test side.*too small"):
        load_probe_task(labelled, "mri_tissue", big, seed=0)


def test_the_bench_leaves_out_a_task_too_small_for_its_inputs_and_says_why(labelled: Path, tiny: StageConfig) -> None:
    modalities = tiny.model.model_dump()["modalities"]
    modalities["mri"] = {**modalities["mri"], "img_size": (48, 48, 48), "patch_size": (8, 8, 8)}
    config = build_config("tiny", {"model": {"modalities": modalities}})
    data = load_bench_data(labelled, config, ("ct", "mri"), seed=0)
    names = [t.name for t in data.tasks]
    assert "ct_hu_tissue" in names and "mri_tissue" not in names  # the 80-voxel atlas cannot test a 48³ patch
    left_out = [n for n in data.notes if n.startswith("probe task left out: ")]
    assert any("'mri_tissue'" in n and "too small" in n for n in left_out)
    with pytest.raises(SiteDataError, match="'mri_tissue'"):  # named explicitly: refused, not dropped
        load_bench_data(labelled, config, ("ct", "mri"), seed=0, tasks=("ct_hu_tissue", "mri_tissue"))


def test_pathology_tasks_are_marked_pseudo(labelled: Path, tiny: StageConfig) -> None:
    stain = load_probe_task(labelled, "pathology_stain", spec_of(tiny, "pathology"), seed=0)
    assert stain.pseudo and stain.classes == ["he", "ihc"] and stain.x.shape[1:] == (3, 16, 16)
    assert "region-level" in stain.split_note  # IHC has one slide only
    density = load_probe_task(labelled, "pathology_hematoxylin", spec_of(tiny, "pathology"), seed=0)
    assert density.pseudo and set(density.y.tolist()) == {0, 1}


def test_per_class_cap(labelled: Path, tiny: StageConfig) -> None:
    probe = load_probe_task(labelled, "mri_tumour", spec_of(tiny, "mri"), seed=0, max_per_class=7)
    assert int(torch.bincount(probe.y).max()) <= 7


def test_probe_seed_is_deterministic(labelled: Path, tiny: StageConfig) -> None:
    a = load_probe_task(labelled, "ct_hu_tissue", spec_of(tiny, "ct"), seed=3)
    b = load_probe_task(labelled, "ct_hu_tissue", spec_of(tiny, "ct"), seed=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.train_mask, b.train_mask)


def test_hematoxylin_density_is_higher_for_purple_than_pink() -> None:
    purple = np.broadcast_to(np.array([90, 60, 150], np.float32)[:, None, None] / 255, (3, 8, 8))
    pink = np.broadcast_to(np.array([230, 160, 200], np.float32)[:, None, None] / 255, (3, 8, 8))
    assert hematoxylin_density(purple) > hematoxylin_density(pink)


def test_missing_tasks_file_and_unknown_task_are_clear(tmp_path: Path, labelled: Path, tiny: StageConfig) -> None:
    with pytest.raises(SiteDataError, match="samples fetch"):
        list_probe_tasks(tmp_path)
    with pytest.raises(SiteDataError, match="unknown probe task"):
        load_probe_task(labelled, "nope", spec_of(tiny, "ct"))


def test_malformed_task_file_is_refused_with_a_fix(tmp_path: Path) -> None:
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "tasks.json").write_text(json.dumps({"tasks": {"t": {"modality": "ct"}}}))
    with pytest.raises(SiteDataError, match=r"lacks valid .*samples fetch --force"):
        list_probe_tasks(tmp_path)


def test_subject_folds_test_every_subject_once_with_every_class_on_both_sides(
    labelled: Path, tiny: StageConfig
) -> None:
    probe = load_probe_task(labelled, "mri_tumour", spec_of(tiny, "mri"), seed=1)
    assert probe.folds is not None and probe.folds.shape == (probe.num_folds, len(probe.y))
    assert torch.equal(probe.folds[0] == 1, probe.train_mask), "fold 0 is the primary split"
    tested: list[str] = []
    for flags in probe.folds:
        train = {s for s, f in zip(probe.subjects, flags.tolist()) if f == 1}
        test = {s for s, f in zip(probe.subjects, flags.tolist()) if f == 0}
        assert train and test and train.isdisjoint(test)
        for label in range(len(probe.classes)):
            assert (probe.y[flags == 1] == label).any() and (probe.y[flags == 0] == label).any()
        tested += sorted(test)
    assert len(tested) == len(set(tested)), "one held-out subject per fold, never the same twice"
    assert probe.num_folds >= 2 and "cross-validation folds" in probe.split_note


def test_region_folds_mirror_the_cut(labelled: Path, tiny: StageConfig) -> None:
    probe = load_probe_task(labelled, "mri_tissue", spec_of(tiny, "mri"), seed=0)
    assert probe.folds is not None and probe.num_folds == 2 and "second fold" in probe.split_note
    primary, mirrored = probe.folds
    assert not bool(((primary == 0) & (mirrored == 0)).any()), "the last 30 % and the first 30 % never overlap"
    for flags in probe.folds:
        assert set(probe.y[flags == 0].tolist()) == set(probe.y[flags == 1].tolist()) == {0, 1, 2}
