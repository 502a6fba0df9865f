"""Crops stay inside their bounds, prefer foreground, and splits are deterministic and disjoint."""

from __future__ import annotations

import numpy as np
import pytest

from invcoss_core.data.sampling import (
    cap_indices,
    centre_input,
    fit_size,
    grid_starts,
    plan_split,
    random_starts,
    region_bounds,
    sample_patches,
    split_subjects,
)


def test_random_starts_stay_in_bounds() -> None:
    rng = np.random.default_rng(0)
    bounds = [(0, 30), (10, 40), (5, 25)]
    starts = random_starts((50, 50, 30), (8, 8, 8), 500, rng, bounds)
    for axis, (lo, hi) in enumerate(bounds):
        assert starts[:, axis].min() >= lo and starts[:, axis].max() + 8 <= hi


def test_random_starts_prefer_foreground() -> None:
    foreground = np.zeros((64, 64, 64), bool)
    foreground[40:48, 40:48, 40:48] = True
    starts = random_starts((64, 64, 64), (8, 8, 8), 400, np.random.default_rng(1), None, foreground, 0.9)
    centres = starts + 4
    inside = np.all((centres >= 40) & (centres < 48 + 4), axis=1)
    assert 0.8 < inside.mean() <= 1.0


def test_grid_starts_do_not_overlap() -> None:
    starts = grid_starts((40, 33), (16, 16))
    assert starts.tolist() == [[0, 0], [0, 16], [16, 0], [16, 16]]


def test_fit_size_pads_centred_with_fill() -> None:
    image = np.ones((1, 4, 10), np.float32)
    padded = fit_size(image, (8, 8), fill=0.5)
    assert padded.shape == (1, 8, 10)
    assert padded[0, 0, 0] == 0.5 and padded[0, 2, 0] == 1.0


def test_split_subjects_is_seeded_and_keeps_one_for_training() -> None:
    names = [f"s{i}" for i in range(10)]
    val = split_subjects(names, 0.2, seed=3)
    assert len(val) == 2 and val == split_subjects(list(reversed(names)), 0.2, seed=3)
    assert len(split_subjects(["a", "b"], 0.9, seed=0)) == 1


def test_plan_split_subject_and_region_modes() -> None:
    train = plan_split(["a", "b", "c", "d", "e"], "train", 0.2, 0)
    val = plan_split(["a", "b", "c", "d", "e"], "val", 0.2, 0)
    assert train.mode == val.mode == "subject" and not (train.subjects & val.subjects)
    assert train.subjects | val.subjects == {"a", "b", "c", "d", "e"}
    single = plan_split(["only"], "val", 0.2, 0)
    assert single.mode == "region" and "one subject" in single.note
    with pytest.raises(ValueError, match="val_fraction is 0"):
        plan_split(["a", "b"], "val", 0.0, 0)


def test_region_bounds_are_disjoint_along_the_longest_axis() -> None:
    train = region_bounds((30, 100, 20), (16, 16, 16), 0.2, "train")
    val = region_bounds((30, 100, 20), (16, 16, 16), 0.2, "val")
    assert train[1] == (0, 80) and val[1] == (80, 100) and train[0] == val[0] == (0, 30)


def test_sample_patches_shapes_for_each_kind() -> None:
    rng = np.random.default_rng(0)
    volume = rng.uniform(0, 1, (1, 30, 30, 30)).astype(np.float32)
    assert sample_patches(volume, "ct", (16, 16, 16), 5, rng).shape == (5, 1, 16, 16, 16)
    tissue = np.full((3, 64, 64), 0.5, np.float32)
    tissue[0] = 0.7
    assert sample_patches(tissue, "pathology", (16, 16), 7, rng).shape == (7, 3, 16, 16)
    grey = rng.uniform(0, 1, (1, 128, 100)).astype(np.float32)
    patches = sample_patches(grey, "xray", (16, 16), 6, rng)
    assert patches.shape == (6, 1, 16, 16) and patches.min() >= 0 and patches.max() <= 1


def test_sample_patches_in_region_never_cross_the_cut() -> None:
    rng = np.random.default_rng(0)
    volume = np.zeros((1, 20, 100, 20), np.float32)
    volume[0, :, 80:, :] = 1.0  # the validation region is bright
    bounds = region_bounds((20, 100, 20), (16, 16, 16), 0.2, "train")
    patches = sample_patches(volume, "mri", (16, 16, 16), 50, rng, bounds)
    assert patches.max() == 0.0


def test_centre_input_uses_foreground_centre() -> None:
    volume = np.zeros((1, 40, 40, 40), np.float32)
    volume[0, 30:36, 30:36, 30:36] = 1.0
    out = centre_input(volume, "mri", (8, 8, 8))
    assert out.shape == (1, 8, 8, 8) and out.mean() > 0.3


def test_cap_indices_is_sorted_subset() -> None:
    keep = cap_indices(100, 10, np.random.default_rng(0))
    assert len(keep) == 10 and np.all(np.diff(keep) > 0)
    assert len(cap_indices(5, None, np.random.default_rng(0))) == 5
