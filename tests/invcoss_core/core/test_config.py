"""Configuration: presets validate, typos and bad values fail naming the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from invcoss_core.config import ConfigError, ModalitySpec, build_config, load_config


@pytest.mark.parametrize("profile", ["tiny", "small", "base"])
def test_profiles_validate_and_are_frozen(profile: str) -> None:
    cfg = build_config(profile)
    assert cfg.profile == profile
    assert set(cfg.model.modalities) >= {"ct", "mri", "pathology", "xray"}
    with pytest.raises(ValidationError):
        cfg.train.epochs = 3  # type: ignore[misc]


def test_base_profile_is_vit_b() -> None:
    model = build_config("base").model
    assert (model.hidden_size, model.num_layers, model.num_heads) == (768, 12, 12)


def test_typo_in_toml_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "stage.toml"
    path.write_text("[train]\nepohcs = 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.epohcs" in str(err.value)
    assert str(path) in str(err.value)


def test_bad_value_names_key(tmp_path: Path) -> None:
    path = tmp_path / "stage.toml"
    path.write_text("[train]\nlr = -1.0\n")
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config(path)


def test_invalid_toml_reports_position(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[train\nepochs = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_unknown_profile_lists_choices() -> None:
    with pytest.raises(ConfigError, match="tiny, small, base"):
        build_config("huge")


def test_toml_overrides_profile_values(tmp_path: Path) -> None:
    path = tmp_path / "stage.toml"
    path.write_text('profile = "small"\n[train]\nepochs = 3\n[replay]\nstrategy = "ewc"\n')
    cfg = load_config(path)
    assert cfg.profile == "small" and cfg.train.epochs == 3 and cfg.replay.strategy == "ewc"
    assert cfg.model.hidden_size == build_config("small").model.hidden_size


def test_cross_field_rules_explain_the_fix() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        build_config("tiny", {"model": {"hidden_size": 30, "num_heads": 4}})
    with pytest.raises(ConfigError, match="min_lr"):
        build_config("tiny", {"train": {"lr": 1e-4, "min_lr": 1e-3}})
    with pytest.raises(ConfigError, match="cluster_fraction"):
        build_config("tiny", {"replay": {"buffer_fraction": 0.01, "cluster_fraction": 0.05}})


def test_modality_spec_rejects_non_dividing_patch() -> None:
    with pytest.raises(ValueError, match="must divide"):
        ModalitySpec(spatial_dims=2, in_channels=1, img_size=(16, 16), patch_size=(5, 5))
    with pytest.raises(ValueError, match="entries"):
        ModalitySpec(spatial_dims=3, in_channels=1, img_size=(16, 16), patch_size=(4, 4))


def test_modality_spec_derived_sizes() -> None:
    spec = ModalitySpec(spatial_dims=3, in_channels=1, img_size=(16, 16, 16), patch_size=(4, 4, 4))
    assert spec.num_patches == 64 and spec.patch_dim == 64 and spec.input_shape == (1, 16, 16, 16)
