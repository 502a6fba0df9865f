"""The privacy policy on the site: a hand-off above privacy.max_mia_auc is held with a message naming the figure;
only the site's own setting releases it (recorded in the signed manifest); the audit log and `audit` show it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from invcoss_core.artifact import decode_artifact
from invcoss_core.common.protocol import StageRequest
from invcoss_core.common.signing import PrivateKey
from site_client.audit import privacy_fields, stage_privacy
from site_client.cli import app as client_app
from site_client.config import load_site_config
from site_client.metrics import SiteEvents
from site_client.runner import RefusedError, resolve_stage_config, run_site_stage
from tests.site_client.conftest import write_site_toml

# 8 one-image subjects, no validation split, half of them held out for the audit; 150 steps on the 8 training
# crops: the tiny MAE memorises them (the calibrated AUC is far above 0.60).
MEMORISE = {
    "replay": {"strategy": "none"},
    "train": {"epochs": 1, "steps_per_epoch": 150, "batch_size": 8, "lr": 3e-3, "warmup_fraction": 0.02},
    "data": {"samples_per_volume": 2, "val_fraction": 0.0},
    "privacy": {"audit_fraction": 0.5, "mask_repeats": 4},
}


@pytest.fixture(scope="module")
def xray_subjects(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("xray-subjects") / "xray"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        image = rng.uniform(0, 255, (24, 24)).astype(np.uint8)
        Image.fromarray(image).save(root / f"subject{i}.png")
    return root


def _request(settings: dict[str, object]) -> StageRequest:
    return StageRequest(
        run_id="run-p",
        stage_index=1,
        site="A",
        modality="xray",
        profile="tiny",
        settings=settings,
        attempt=1,
        parent_sha256=None,
        parent_site=None,
        parent_parent_sha256=None,
        parent_public_key=None,
        files={},
    )


def test_a_memorising_stage_is_held_then_released_only_by_the_site(
    tmp_path: Path, xray_subjects: Path, site_key: PrivateKey
) -> None:
    cfg = load_site_config(write_site_toml(tmp_path, xray_subjects, modality="xray"))
    events = SiteEvents(cfg.work_dir / "events.jsonl")
    with pytest.raises(RefusedError, match=r"calibrated membership-inference AUC is (0\.[6-9]\d\d|1\.000)") as held:
        run_site_stage(cfg, _request(MEMORISE), site_key, events)
    assert "max_mia_auc = 0.60" in str(held.value) and "release_above_max" in str(held.value)
    rows = stage_privacy(cfg.work_dir)  # the held artifact stays on the site; `audit` lists it
    assert [r["privacy"]["decision"] for r in rows] == ["held"]

    # the coordinator cannot release it
    coordinator_release = {**MEMORISE, "privacy": {**MEMORISE["privacy"], "release_above_max": True}}  # type: ignore[dict-item]
    assert not resolve_stage_config(cfg, _request(coordinator_release)).privacy.release_above_max

    # the site operator can, and the signed manifest records it
    released_cfg = load_site_config(
        write_site_toml(tmp_path, xray_subjects, modality="xray", stage={"privacy": {"release_above_max": True}})
    )
    reply = run_site_stage(released_cfg, replace(_request(MEMORISE), attempt=3), site_key, events)
    artifact = decode_artifact(reply.files, public_key=site_key.public_key(), require_signature=True)
    privacy = artifact.manifest.privacy
    assert privacy is not None and privacy.decision == "released_by_operator"
    assert privacy.calibrated_loss is not None and privacy.calibrated_loss.auc > 0.6
    assert reply.metrics["privacy_calibrated_auc"] == privacy.calibrated_loss.auc
    assert reply.metrics["privacy_audit_subjects"] == 4
    assert privacy_fields(reply.files)["privacy"]["decision"] == "released_by_operator"

    result = CliRunner().invoke(client_app, ["audit", "--site", "A", "--config", str(tmp_path / "site.toml"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["privacy"][0]["privacy"]["decision"] == "released_by_operator"


def test_an_unmeasured_audit_adds_no_figure_that_run_json_cannot_hold() -> None:
    """A stage whose audit was not measured (too few subjects) must not put NaN into the coordinator's run.json."""
    import math

    from invcoss_core.config import PrivacyConfig
    from invcoss_core.privacy import audit_split
    from invcoss_core.privacy.audit import not_measured
    from server.state import RunState, StageRecord
    from site_client.runner import privacy_metrics

    split = audit_split(["only-one-subject"] * 4, 0.15, seed=0)
    figures = privacy_metrics(not_measured(split, PrivacyConfig()))
    assert all(math.isfinite(v) for v in figures.values()) and "privacy_calibrated_auc" not in figures
    state = RunState(
        run_id="r",
        plan_sha256="0" * 64,
        created_at="t",
        updated_at="t",
        stages=[StageRecord(index=1, site="A", metrics=figures)],
    )
    assert RunState.model_validate_json(state.model_dump_json()).stages[0].metrics == figures
