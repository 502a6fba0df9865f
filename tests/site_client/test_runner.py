"""A stage on a site: policy, incoming verification, training with resume, idempotent reuse, replay refusal."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from invcoss_core.artifact import decode_artifact
from invcoss_core.common.protocol import StageRequest
from invcoss_core.common.signing import generate_private_key, public_key_openssh
from invcoss_core.config import ConfigError
from site_client.config import SiteConfig
from site_client.metrics import SiteEvents
from site_client.runner import RefusedError, run_site_stage, stage_paths, verify_incoming

FAST = {"replay": {"strategy": "none"}, "train": {"epochs": 2}, "data": {"samples_per_volume": 4}}


def _request(**changes: object) -> StageRequest:
    base = StageRequest(
        run_id="run-1",
        stage_index=1,
        site="A",
        modality="pathology",
        profile="tiny",
        settings=FAST,
        attempt=1,
        parent_sha256=None,
        parent_site=None,
        parent_parent_sha256=None,
        parent_public_key=None,
        files={},
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def _events(cfg: SiteConfig) -> SiteEvents:
    return SiteEvents(cfg.work_dir / "events.jsonl")


def test_stage_one_trains_signs_and_is_reused_on_a_repeated_request(site_config: SiteConfig, site_key) -> None:
    first = run_site_stage(site_config, _request(), site_key, _events(site_config))
    assert first.status == "ok" and not first.reused
    artifact = decode_artifact(first.files, public_key=site_key.public_key(), require_signature=True)
    assert artifact.sha256 == first.artifact_sha256
    assert artifact.manifest.site == "A" and artifact.manifest.stage_index == 1
    assert len(first.epoch_losses) == 2
    again = run_site_stage(site_config, _request(attempt=2), site_key, _events(site_config))
    assert again.reused and again.files == first.files


class _CrashError(Exception):
    pass


class _CrashAfterFirstEpoch(SiteEvents):
    def progress(self, event) -> None:  # type: ignore[no-untyped-def]
        super().progress(event)
        if "epoch_loss" in event.metrics:
            raise _CrashError  # the stage process dies after its epoch-1 checkpoint was written


def test_an_interrupted_stage_resumes_from_its_epoch_checkpoint(site_config: SiteConfig, site_key) -> None:
    long = {**FAST, "train": {"epochs": 3}}
    with pytest.raises(_CrashError):
        run_site_stage(
            site_config, _request(settings=long), site_key, _CrashAfterFirstEpoch(site_config.work_dir / "events.jsonl")
        )
    resumed = run_site_stage(site_config, _request(settings=long, attempt=2), site_key, _events(site_config))
    assert resumed.status == "ok" and not resumed.reused
    assert resumed.resumed_from_epoch == 1
    assert len(resumed.epoch_losses) == 3
    kinds = [json.loads(line)["kind"] for line in (site_config.work_dir / "events.jsonl").read_text().splitlines()]
    assert "stage_resumed" in kinds


def test_real_buffer_replay_is_refused(site_config: SiteConfig, site_key) -> None:
    with pytest.raises(RefusedError, match="real images off the site"):
        run_site_stage(
            site_config, _request(settings={"replay": {"strategy": "real_buffer"}}), site_key, _events(site_config)
        )


def test_wrong_site_or_modality_is_refused(site_config: SiteConfig, site_key) -> None:
    with pytest.raises(RefusedError, match="addressed to site 'B'"):
        run_site_stage(site_config, _request(site="B"), site_key, _events(site_config))
    with pytest.raises(RefusedError, match="modality 'ct'"):
        run_site_stage(site_config, _request(modality="ct"), site_key, _events(site_config))


def test_unsafe_run_id_and_bad_settings_are_refused(site_config: SiteConfig, site_key) -> None:
    with pytest.raises(RefusedError, match="plain name"):
        run_site_stage(site_config, _request(run_id="../../etc"), site_key, _events(site_config))
    with pytest.raises(ConfigError, match=r"train\.epoch"):
        run_site_stage(site_config, _request(settings={"train": {"epoch": 1}}), site_key, _events(site_config))


def test_incoming_artifact_checks(site_config: SiteConfig, site_key, tmp_path: Path) -> None:
    stage1 = run_site_stage(site_config, _request(), site_key, _events(site_config))
    key = public_key_openssh(site_key).decode()
    good = _request(
        stage_index=2,
        site="B",
        files=stage1.files,
        parent_sha256=stage1.artifact_sha256,
        parent_site="A",
        parent_public_key=key,
    )
    assert verify_incoming(site_config, good) is not None
    with pytest.raises(RefusedError, match="stage 1 must not come with a parent"):
        verify_incoming(site_config, _request(files=stage1.files))
    with pytest.raises(RefusedError, match="not the announced parent"):
        verify_incoming(site_config, replace(good, parent_sha256="0" * 64))
    with pytest.raises(RefusedError, match="signature does not verify"):
        other = public_key_openssh(generate_private_key()).decode()
        verify_incoming(site_config, replace(good, parent_public_key=other))
    with pytest.raises(RefusedError, match="replayed older artifact: stage 1 where stage 2 was expected"):
        verify_incoming(site_config, replace(good, stage_index=3))
    with pytest.raises(RefusedError, match="comes from site 'A', expected 'C'"):
        verify_incoming(site_config, replace(good, parent_site="C"))
    tampered = dict(stage1.files)
    tampered["stats.safetensors"] = tampered["stats.safetensors"] + b" "
    with pytest.raises(RefusedError, match="modified or corrupt"):
        verify_incoming(site_config, replace(good, files=tampered))


def test_pinned_peer_key_must_match_the_coordinator_sent_key(site_config: SiteConfig, site_key, tmp_path: Path) -> None:
    stage1 = run_site_stage(site_config, _request(), site_key, _events(site_config))
    pinned = tmp_path / "pinned"
    pinned.mkdir()
    (pinned / "A.pub").write_bytes(public_key_openssh(generate_private_key()))
    cfg = site_config.model_copy(update={"trust": site_config.trust.model_copy(update={"pinned_keys_dir": pinned})})
    request = _request(
        stage_index=2,
        site="B",
        files=stage1.files,
        parent_sha256=stage1.artifact_sha256,
        parent_site="A",
        parent_public_key=public_key_openssh(site_key).decode(),
    )
    with pytest.raises(RefusedError, match="differs from the key pinned"):
        verify_incoming(cfg, request)


def test_a_finished_stage_is_not_rerun_from_another_parent(site_config: SiteConfig, site_key) -> None:
    run_site_stage(site_config, _request(), site_key, _events(site_config))
    paths = stage_paths(site_config, "run-1", 1)
    result = json.loads(paths.result.read_text())
    result["parent_sha256"] = "e" * 64  # as if stage 1 of this run had been run from another parent
    paths.result.write_text(json.dumps(result))
    with pytest.raises(RefusedError, match="already run on this site from another parent"):
        run_site_stage(site_config, _request(), site_key, _events(site_config))
