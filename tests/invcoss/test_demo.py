"""The demo's running commentary: what the coordinator waits for and why an attempt failed, each said once."""

from __future__ import annotations

from pathlib import Path

from invcoss.demo import _Progress
from invcoss.localfed import LocalFederation, LocalSite
from invcoss_core.common.eventlog import emit_event


def test_progress_says_waits_failed_attempts_and_retries_once(tmp_path: Path) -> None:
    fed = LocalFederation(tmp_path, [LocalSite("A", "ct", tmp_path / "ct")])
    fed.layout.root.mkdir(parents=True)
    said: list[str] = []
    progress = _Progress(fed, said.append)
    state = {"stages": [{"index": 1, "site": "A", "modality": "ct", "status": "pending"}]}
    emit_event(fed.layout.events, "site_waiting", site="A")
    progress.update(state)
    emit_event(fed.layout.events, "stage_failed_attempt", stage=1, error="attempt 1: site A did not come online")
    emit_event(fed.layout.events, "stage_retry", stage=1, site="A", attempt=2, wait_s=2.0)
    progress.update(state)
    progress.update(state)
    assert said == [  # coordinator events first: a stage's failed attempt is told before its failed status
        "waiting for site A to come online",
        "stage 1 at site A (ct): pending",
        "stage 1: attempt 1: site A did not come online",
        "stage 1: attempt 2 in 2.0 s",
    ]


def test_progress_of_a_running_stage_is_its_sites_latest_step_read_as_the_file_grows(tmp_path: Path) -> None:
    fed = LocalFederation(tmp_path, [LocalSite("A", "ct", tmp_path / "ct")])
    fed.layout.root.mkdir(parents=True)
    events = fed.site_work("A") / "events.jsonl"
    events.parent.mkdir(parents=True)
    said: list[str] = []
    progress = _Progress(fed, said.append)
    state = {"stages": [{"index": 1, "site": "A", "modality": "ct", "status": "running"}]}
    for step in (1, 2):
        emit_event(events, "progress", phase="train", step=step, total=10)
    emit_event(events, "stage_started", stage=1)
    progress.next_beat = 0.0
    progress.update(state)
    emit_event(events, "progress", phase="inversion", step=3, total=8)
    progress.next_beat = 0.0
    progress.update(state)
    assert said == ["stage 1 at site A (ct): running", "  site A: train 2/10", "  site A: inversion 3/8"]


def test_sites_topology_parses_in_stage_order_and_names_mistakes() -> None:
    import pytest

    from invcoss.demo import TopologyError, parse_topology

    assert parse_topology("ct=2, mri=2,pathology=1") == [("ct", 2), ("mri", 2), ("pathology", 1)]
    for bad, message in (("ct=0", "COUNT ≥ 1"), ("bone=2", "MODALITY one of"), ("ct=2,ct=1", "twice"), ("", "empty")):
        with pytest.raises(TopologyError, match=message):
            parse_topology(bad)


def test_consortium_plan_gives_each_site_whole_subjects(tmp_path: Path) -> None:
    from invcoss.demo import consortium_plan
    from tests.integration.conftest import generated_site_data

    samples = generated_site_data(tmp_path / "samples")
    sites, stages = consortium_plan(samples, [("ct", 2), ("pathology", 1)], tmp_path / "data")
    assert [s.name for s in sites] == ["ct1", "ct2", "pathology1"]
    assert stages[0]["sites"] == ["ct1", "ct2"] and stages[1] == {"site": "pathology1", "modality": "pathology"}
    held = [sorted(p.name for p in (s.data_dir / "ct").iterdir()) for s in sites[:2]]
    assert held == [["subject0.nii.gz"], ["subject1.nii.gz"]]
    import pytest

    from invcoss.localfed import FederationError

    with pytest.raises(FederationError, match="2 subject"):
        consortium_plan(samples, [("ct", 3)], tmp_path / "more")
