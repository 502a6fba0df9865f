"""federation.toml validation: typos and bad values fail at start-up, naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from invcoss_core.config import ConfigError
from server.config import RetrySettings, load_federation_config, parse_federation_config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "federation.toml"
    path.write_text(text)
    return path


def test_federation_toml_resolves_paths_and_merges_stage_settings(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
profile = "tiny"
state_dir = "run-state"
[defaults]
replay = { strategy = "ewc" }
train = { epochs = 3 }
[superlink]
port = 9999
[[stages]]
site = "A"
modality = "ct"
[[stages]]
site = "B"
[stages.overrides]
train = { epochs = 5 }
""",
    )
    cfg = load_federation_config(path)
    assert cfg.state_dir == (tmp_path / "run-state").resolve()
    assert cfg.superlink.certs_dir == (tmp_path / "certs").resolve()
    assert cfg.superlink.dial_address == "127.0.0.1:9999"
    assert cfg.stage_config(1).train.epochs == 3
    assert cfg.stage_config(2).train.epochs == 5
    assert cfg.stage_config(2).replay.strategy == "ewc"


def test_unknown_key_is_named_with_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, '[[stages]]\nsite = "A"\n[retry]\nmax_attempt = 2\n')
    with pytest.raises(ConfigError, match=r"(?s)federation.toml.*unknown key 'retry.max_attempt'"):
        load_federation_config(path)


def test_bad_stage_settings_name_the_stage_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, '[[stages]]\nsite = "A"\n[stages.overrides]\ntrain = { epoch = 2 }\n')
    with pytest.raises(ConfigError, match=r"(?s)stages\]\] #1 \(site A\).*train.epoch"):
        load_federation_config(path)


def test_real_buffer_replay_is_refused_in_the_plan(tmp_path: Path) -> None:
    path = _write(tmp_path, '[defaults]\nreplay = { strategy = "real_buffer" }\n[[stages]]\nsite = "A"\n')
    with pytest.raises(ConfigError, match="real_buffer"):
        load_federation_config(path)


@pytest.mark.parametrize("site", ["../A", "", "a b", "x" * 65])
def test_site_names_are_plain(tmp_path: Path, site: str) -> None:
    with pytest.raises(ConfigError, match="site"):
        parse_federation_config({"stages": [{"site": site}]}, "f.toml", tmp_path)


def test_unknown_modality_and_empty_plan_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="modality"):
        parse_federation_config({"stages": [{"site": "A", "modality": "ultrasound"}]}, "f.toml", tmp_path)
    with pytest.raises(ConfigError, match="stages"):
        parse_federation_config({"stages": []}, "f.toml", tmp_path)


def test_ttl_must_cover_the_stage_timeout_and_backoff_grows() -> None:
    with pytest.raises(ValueError, match="message_ttl_s"):
        RetrySettings(stage_timeout_s=100, message_ttl_s=50)
    retry = RetrySettings(backoff_s=5, backoff_factor=2, max_backoff_s=15)
    assert [retry.backoff(n) for n in (1, 2, 3, 4)] == [5, 10, 15, 15]
    assert RetrySettings(stage_timeout_s=100).ttl_s == 700


def test_plan_digest_changes_with_the_plan_only(tmp_path: Path) -> None:
    base = {"stages": [{"site": "A"}, {"site": "B"}]}
    a = parse_federation_config(base, "f", tmp_path)
    b = parse_federation_config({**base, "retry": {"max_attempts": 5}}, "f", tmp_path)
    c = parse_federation_config({"stages": [{"site": "B"}, {"site": "A"}]}, "f", tmp_path)
    assert a.plan_sha256() == b.plan_sha256() != c.plan_sha256()


CONSORTIUM = """
[[stages]]
sites = ["A1", "A2", "A3"]
modality = "ct"
rounds = 3
local_steps = 10
min_sites = 2
inversion_site = "A2"
[[stages]]
site = "B"
modality = "mri"
"""


def test_consortium_stage_parses_with_its_round_settings(tmp_path: Path) -> None:
    cfg = load_federation_config(_write(tmp_path, CONSORTIUM))
    stage = cfg.stages[0]
    assert stage.is_consortium and stage.site_names == ["A1", "A2", "A3"]
    assert (stage.rounds, stage.local_steps, stage.required_sites, stage.signer) == (3, 10, 2, "A2")
    assert not cfg.stages[1].is_consortium and cfg.stages[1].signer == "B" and cfg.stages[1].required_sites == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("min_sites = 2", "min_sites = 4"), r"stages\.0.*'min_sites' = 4 is larger than the 3 site"),
        (('inversion_site = "A2"', 'inversion_site = "Z9"'), r"stages\.0.*'inversion_site' = 'Z9' is not one of"),
        (
            ('site = "B"\nmodality = "mri"', 'site = "A1"\nmodality = "ct"'),
            r"site 'A1' is also in stage 1.*two different modalities",
        ),
        (('sites = ["A1", "A2", "A3"]', 'sites = ["A1", "A1"]'), r"'sites' names A1 more than once"),
        (('modality = "ct"\nrounds', "rounds"), r"consortium stage .* must say its 'modality'"),
        (("rounds = 3", "rounds = 3\nsecure_aggregation = true"), r"'secure_aggregation' is not available"),
        (('site = "B"', 'site = "B"\nrounds = 2'), r"'rounds', 'local_steps' and 'min_sites' need 'sites"),
        (('site = "B"', 'site = "B"\nsites = ["C"]'), r"exactly one of 'site'"),
    ],
)
def test_consortium_mistakes_name_the_key(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    text = CONSORTIUM.replace(*change)
    assert text != CONSORTIUM
    with pytest.raises(ConfigError, match=rf"(?s)federation.toml.*{message}"):
        load_federation_config(_write(tmp_path, text))


def test_a_site_may_join_two_stages_of_different_modalities(tmp_path: Path) -> None:
    cfg = load_federation_config(_write(tmp_path, CONSORTIUM.replace('site = "B"\n', 'site = "A1"\n')))
    assert cfg.stages[1].site_names == ["A1"]
