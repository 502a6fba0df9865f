"""A 2+2+1 consortium on 127.0.0.1 (SuperLink + five SuperNodes, TLS, node auth), surviving two crashes.

Stage 1 (CT, sites ct1 + ct2, 3 FedAvg rounds, min_sites 1): site ct2's whole `invcoss-client` process group is
SIGKILLed while it trains round 2 and restarted at once; round 2 must complete with ct1 alone and ct2 must
rejoin at round 3. Stage 2 (MRI, mri1 + mri2, 2 rounds): the coordinator's process group is SIGKILLed once round 1
is recorded, and restarted; it must resume at round 2, not at the stage's start. Stage 3 is a one-site stage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from invcoss.demo import consortium_plan, verify_chain
from invcoss.localfed import LocalFederation
from invcoss_core.artifact import read_artifact_dir
from invcoss_core.common.processes import descendants, pid_alive
from server.state import read_journal
from tests.integration.conftest import FAST_DEFAULTS
from tests.integration.helpers import BIN

pytestmark = pytest.mark.integration


@dataclass
class ConsortiumRun:
    """What the run observed along the way."""

    fed: LocalFederation
    killed_site_tree: list[int] = field(default_factory=list)
    killed_site_survivors: list[int] = field(default_factory=list)
    coordinator_killed_after_rounds: int = 0
    flower_runs_before_restart: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    audits: dict[str, dict[str, Any]] = field(default_factory=dict)
    wall_seconds: float = 0.0


def _round_started(fed: LocalFederation, site: str, stage: int, round_index: int) -> bool:
    return any(
        e.get("kind") == "round_started" and e.get("stage") == stage and e.get("round") == round_index
        for e in fed.site_events(site)
    )


def _kill_site_group(fed: LocalFederation, site: str, record: ConsortiumRun) -> None:
    """SIGKILL the site's supervisor, its SuperNode and its running ClientApp, then start the site again."""
    supervisor = fed.processes[f"site-{site}"]
    record.killed_site_tree = [supervisor.pid, *descendants(supervisor.pid)]
    for pid in record.killed_site_tree:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    supervisor.wait(timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(pid_alive(p) for p in record.killed_site_tree):
        time.sleep(0.2)
    record.killed_site_survivors = [p for p in record.killed_site_tree if pid_alive(p)]
    fed.start_site(site)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory, site_data_root: Path) -> Iterator[ConsortiumRun]:
    started = time.monotonic()
    root = tmp_path_factory.mktemp("consortium")
    sites, stages = consortium_plan(site_data_root, [("ct", 2), ("mri", 2), ("pathology", 1)], root / "data")
    stages[0].update(rounds=3, min_sites=1)
    fed = LocalFederation(
        root / "federation",
        sites,
        defaults=FAST_DEFAULTS,
        # all_sites_wait_s covers a hard-killed SuperNode's re-activation (~60 s, docs/federation.md "Limits").
        release_held=True,  # these runs test the federation's mechanics, not where the audit puts a stage
        retry={"stage_timeout_s": 300.0, "backoff_s": 1.0, "max_attempts": 4, "all_sites_wait_s": 150.0},
        stages=stages,
    )
    record = ConsortiumRun(fed)
    with fed:
        fed.setup()
        fed.start_all()
        deadline = time.monotonic() + 420
        while not _round_started(fed, "ct2", 1, 2) and time.monotonic() < deadline:
            fed.check_sites_running()
            time.sleep(0.2)
        assert _round_started(fed, "ct2", 1, 2), "site ct2 never started round 2 of stage 1"
        _kill_site_group(fed, "ct2", record)
        state = fed.wait_until(lambda s: len(s["stages"][1].get("rounds", [])) >= 1, 600, "stage 2's first round")
        record.flower_runs_before_restart = len(state["flower_run_ids"])
        fed.stop("coordinator", signal.SIGKILL)
        record.coordinator_killed_after_rounds = len(fed.state()["stages"][1]["rounds"])
        fed.start_coordinator()
        record.state = fed.wait_until(lambda s: s["status"] in ("done", "failed"), 900, "the end of the run")
        record.wall_seconds = time.monotonic() - started
        fed.stop_many([f"site-{s.name}" for s in sites])
        record.audits = fed.audit_all()
        yield record


def test_consortium_run_completes_with_a_verified_chain(consortium: ConsortiumRun) -> None:
    state = consortium.state
    assert state["status"] == "done", state.get("error")
    assert [s["status"] for s in state["stages"]] == ["done", "done", "done"]
    assert verify_chain(consortium.fed.layout, state) == 3
    assert [s.get("sites") for s in state["stages"]] == [["ct1", "ct2"], ["mri1", "mri2"], []]
    final = read_artifact_dir(consortium.fed.layout.final / "model")
    assert final.manifest.modalities == ["ct", "mri", "pathology"]
    stage1 = read_artifact_dir(consortium.fed.layout.checkpoint(1))
    assert stage1.manifest.site == "ct1" and stage1.manifest.metrics["consortium_sites"] == 2.0
    assert stage1.manifest.privacy_gate is not None and "gate_blocked_by_ct2" in stage1.manifest.metrics
    for index in (1, 2, 3):  # every hand-off carries its signing site's privacy audit (measured or not, and why)
        assert read_artifact_dir(consortium.fed.layout.checkpoint(index)).manifest.privacy is not None, index
    report = json.loads(consortium.fed.layout.report.read_text())
    assert [len(s["rounds"]) for s in report["stages"]] == [3, 2, 0]
    assert report["stages"][0]["sites"] == ["ct1", "ct2"] and report["stages"][0]["privacy"] is not None


def test_a_site_killed_mid_round_is_left_out_of_that_round_and_rejoins(consortium: ConsortiumRun) -> None:
    assert consortium.killed_site_tree and not consortium.killed_site_survivors
    rounds = consortium.state["stages"][0]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert sorted(rounds[0]["sites"]) == ["ct1", "ct2"]
    assert sorted(rounds[1]["sites"]) == ["ct1"] and "ct2" in rounds[1]["missing"]
    assert sorted(rounds[2]["sites"]) == ["ct1", "ct2"]  # rejoined at the next round


def test_a_killed_coordinator_resumes_at_the_last_completed_round(consortium: ConsortiumRun) -> None:
    assert consortium.coordinator_killed_after_rounds >= 1
    assert len(consortium.state["flower_run_ids"]) > consortium.flower_runs_before_restart
    journal = read_journal(consortium.fed.layout)
    done = [(e["stage"], e["round"]) for e in journal if e["event"] == "round_done"]
    assert done.count((2, 1)) == 1 and done.count((2, 2)) == 1  # round 1 not run again after the restart
    for site in ("mri1", "mri2"):
        starts = [
            e
            for e in consortium.fed.site_events(site)
            if e.get("kind") == "round_started" and e.get("stage") == 2 and e.get("round") == 1
        ]
        assert len(starts) == 1, f"site {site} trained stage 2 round 1 {len(starts)} times"


def test_every_site_sent_weights_statistics_and_verdicts_and_no_real_image(consortium: ConsortiumRun) -> None:
    for site, audit in consortium.audits.items():
        assert audit["outbound_messages"] > 0, site
        assert audit["real_samples"] > 0, site  # the audit hashed something real
        assert audit["real_image_tensors_out"] == 0, site
    kinds = {
        e["kind"]
        for site in ("ct1", "ct2")
        for e in (
            json.loads(line)
            for line in (consortium.fed.site_work(site) / "audit.jsonl").read_text().splitlines()
            if line.strip()
        )
    }
    assert {"round_reply", "stats_reply", "invert_reply", "gate_reply", "finalize_reply"} <= kinds


def test_status_shows_rounds_contributions_and_verdicts(consortium: ConsortiumRun) -> None:
    done = subprocess.run(
        [str(BIN / "invcoss-server"), "status", "--config", str(consortium.fed.federation_toml)],
        capture_output=True,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert "stage 1 round 2: ct1" in out and "missing ct2" in out
    assert "stage 1 gate at ct2:" in out
