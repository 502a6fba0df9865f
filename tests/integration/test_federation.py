"""One real federation on 127.0.0.1 (SuperLink + three SuperNodes, TLS, node auth) shared by several assertions.

The run is made to survive three crashes: the coordinator's whole process group is SIGKILLed right after stage 1
and restarted; site B's `invcoss-client` alone (not its children) is SIGKILLed in the middle of stage 2's training
and restarted by its operator; site C's stage process is SIGKILLed in the middle of stage 3's training. While it
runs, an unenrolled site tries to join. After it, a hostile ServerApp sends tampered artifacts to site C.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import torch

from invcoss.localfed import LocalFederation, LocalSite, free_port
from invcoss_core.artifact import (
    ArtifactError,
    encode_artifact,
    read_artifact_dir,
    read_artifact_files,
    write_artifact_dir,
)
from invcoss_core.common.processes import descendants, pid_alive
from invcoss_core.common.signing import (
    generate_private_key,
    load_private_key,
    load_public_key,
    private_key_openssh,
    public_key_openssh,
    sign_bytes,
)
from server.handoff import verify_stage_artifact
from server.state import read_journal
from server.superlink import flower_env
from tests.integration.conftest import FAST_DEFAULTS
from tests.integration.helpers import BIN, run_embed

pytestmark = pytest.mark.integration


@dataclass
class RunRecord:
    """What the shared run observed along the way."""

    fed: LocalFederation
    stage1_sha_before_kill: str = ""
    flower_runs_before_restart: int = 0
    killed_stage_pid: int = 0
    killed_after_epoch: int = 0
    site_b_tree: list[int] = field(default_factory=list)  # B's supervisor and its descendants when it was killed
    site_b_survivors: list[str] = field(default_factory=list)  # of those, what still ran 20 s later
    site_b_killed_after_epoch: int = 0
    unenrolled_rc: int | None = None
    unenrolled_log: str = ""
    metrics: dict[str, str] = field(default_factory=dict)
    evil: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0


def _scrape(port: int, expect: str = "", timeout_s: float = 10.0) -> str:
    """/metrics text, polled until it contains `expect` (events reach the exporter within a second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        if expect in text or time.monotonic() > deadline:
            return text
        time.sleep(0.3)


def _start_unenrolled_site(fed: LocalFederation, data_dir: Path) -> subprocess.Popen[bytes]:
    """A site with a fresh key that the coordinator never enrolled."""
    root = fed.root / "sites" / "X"
    key = generate_private_key()
    (root / "keys").mkdir(parents=True, exist_ok=True)
    (root / "keys" / "X.key").write_bytes(private_key_openssh(key))
    os.chmod(root / "keys" / "X.key", 0o600)
    config = {
        "site": "X",
        "modality": "ct",
        "data_dir": str(data_dir),
        "work_dir": "work",
        "private_key": "keys/X.key",
        "superlink": {
            "address": f"127.0.0.1:{fed.ports['superlink']}",
            "root_certificates": str(fed.certs_dir / "ca.crt"),
        },
        "supernode": {"clientappio_port": free_port(), "activation_wait_s": 3.0},
        "metrics": {"enabled": False},
    }
    (root / "site.toml").write_text(tomli_w.dumps(config))
    log = open(fed.logs / "site-X.log", "wb")  # noqa: SIM115 - closed by the child's exit
    return subprocess.Popen(
        [str(BIN / "invcoss-client"), "--site", "X", "--config", str(root / "site.toml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stage_pid(fed: LocalFederation, site: str, stage: int) -> tuple[int, int]:
    """(pid of the process running `stage` at `site`, last finished epoch) once an epoch checkpoint exists."""
    pid, epoch = 0, 0
    for event in fed.site_events(site):
        if event.get("kind") == "stage_started" and event.get("stage") == stage:
            pid, epoch = int(event["pid"]), 0
        elif event.get("kind") == "progress" and event.get("pid") == pid and "epoch_loss" in event["metrics"]:
            epoch = int(event["epoch"])
    return pid, epoch


def _kill_site_supervisor(fed: LocalFederation, site: str, record: RunRecord) -> None:
    """SIGKILL only the site's `invcoss-client` mid-stage (as the OOM killer would), then restart it."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        pid, epoch = _stage_pid(fed, site, 2)
        if pid and epoch >= 1:
            supervisor = fed.processes[f"site-{site}"]
            record.site_b_tree = [supervisor.pid, *descendants(supervisor.pid)]
            record.site_b_killed_after_epoch = epoch
            os.kill(supervisor.pid, signal.SIGKILL)
            supervisor.wait()
            gone_by = time.monotonic() + 20
            while time.monotonic() < gone_by and any(pid_alive(p) for p in record.site_b_tree):
                time.sleep(0.2)
            record.site_b_survivors = [
                Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
                for p in record.site_b_tree
                if pid_alive(p)
            ]
            for p in record.site_b_tree:  # whatever survived must not disturb the rest of the run
                if pid_alive(p):
                    os.kill(p, signal.SIGKILL)
            fed.start_site(site)
            return
        time.sleep(0.2)


def _evil_requests(fed: LocalFederation, state: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    """Tampered stage-3 requests for site C: a modified file, a replayed older artifact, a wrong parent."""
    layout = fed.layout
    s1, s2 = state["stages"][0], state["stages"][1]
    settings = dict(FAST_DEFAULTS)
    base = {
        "run_id": state["run_id"],
        "stage_index": 3,
        "site": "C",
        "modality": "pathology",
        "profile": "tiny",
        "settings": settings,
        "attempt": 1,
    }
    key_a = public_key_openssh(load_public_key(layout.enrolled_key("A"))).decode()
    key_b = public_key_openssh(load_public_key(layout.enrolled_key("B"))).decode()
    good2 = read_artifact_files(layout.checkpoint(2))

    modified = dict(good2)
    weights = bytearray(modified["weights.safetensors"])
    weights[-1] ^= 0x01
    modified["weights.safetensors"] = bytes(weights)
    write_artifact_dir(modified, work / "modified")

    stage2 = read_artifact_dir(layout.checkpoint(2))
    key_b_private = load_private_key(fed.site_key("B"))
    wrong_parent = encode_artifact(
        run_id=state["run_id"],
        stage_index=2,
        site="B",
        modalities=stage2.manifest.modalities,
        profile="tiny",
        replay=stage2.manifest.replay,
        parent_sha256="0" * 64,
        architecture=stage2.manifest.architecture,
        weights=stage2.weights,
        stats=stage2.stats,
        synthetic=stage2.synthetic,
        privacy_gate=stage2.manifest.privacy_gate,
        signer=lambda data: sign_bytes(key_b_private, data),
    )
    write_artifact_dir(wrong_parent, work / "wrong-parent")
    wrong_sha = read_artifact_dir(work / "wrong-parent").sha256

    def req(parent_sha: str, parent_site: str, grandparent: str | None, key: str) -> dict[str, Any]:
        return {
            **base,
            "parent_sha256": parent_sha,
            "parent_site": parent_site,
            "parent_parent_sha256": grandparent,
            "parent_public_key": key,
        }

    return [
        {
            "name": "modified",
            "site": "C",
            "files_dir": str(work / "modified"),
            "request": req(s2["artifact_sha256"], "B", s1["artifact_sha256"], key_b),
        },
        {
            "name": "replayed",
            "site": "C",
            "files_dir": str(layout.checkpoint(1)),
            "request": req(s1["artifact_sha256"], "A", None, key_a),
        },
        {
            "name": "wrong_parent",
            "site": "C",
            "files_dir": str(work / "wrong-parent"),
            "request": req(wrong_sha, "B", s1["artifact_sha256"], key_b),
        },
    ]


def _run_evil_app(fed: LocalFederation, state: dict[str, Any]) -> dict[str, Any]:
    work = fed.root / "evil"
    app_dir = work / "app"
    app_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(__file__).with_name("evil_server.py"), app_dir / "evil_server.py")
    requests_file, results_file = work / "requests.json", work / "results.json"
    requests_file.write_text(json.dumps(_evil_requests(fed, state, work)))
    (app_dir / "pyproject.toml").write_text(
        tomli_w.dumps(
            {
                "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
                "project": {"name": "evil", "version": "1.0.0", "dependencies": []},
                "tool": {
                    "flwr": {
                        "app": {
                            "publisher": "test",
                            "components": {"serverapp": "evil_server:app", "clientapp": "site_client.app:app"},
                            "config": {"requests-file": "", "results-file": ""},
                        }
                    }
                },
            }
        )
    )
    done = subprocess.run(
        [
            str(BIN / "flwr"),
            "run",
            str(app_dir),
            "invcoss",
            "--format",
            "json",
            "--run-config",
            f'requests-file="{requests_file}"',
            "--run-config",
            f'results-file="{results_file}"',
        ],
        capture_output=True,
        env=flower_env(fed.layout),
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    deadline = time.monotonic() + 240
    while not results_file.exists() and time.monotonic() < deadline:
        time.sleep(1)
    assert results_file.exists(), "the hostile ServerApp did not report (see the coordinator's SuperLink log)"
    return dict(json.loads(results_file.read_text()))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, site_data_root: Path) -> Iterator[RunRecord]:
    started = time.monotonic()
    sites = [
        LocalSite("A", "ct", site_data_root / "ct"),
        # B and C train longer so that a site's supervisor or its stage process can be killed between two epoch
        # checkpoints.
        LocalSite("B", "mri", site_data_root / "mri", {"train": {"epochs": 4}, "data": {"samples_per_volume": 24}}),
        LocalSite(
            "C", "pathology", site_data_root / "pathology", {"train": {"epochs": 4}, "data": {"samples_per_volume": 24}}
        ),
    ]
    fed = LocalFederation(
        tmp_path_factory.mktemp("federation"),
        sites,
        defaults=FAST_DEFAULTS,
        release_held=True,  # these runs test the federation's mechanics, not where the audit puts a stage
        retry={"stage_timeout_s": 300.0, "backoff_s": 1.0, "max_attempts": 4},
        # 64 KiB parts: the tiny hand-offs' weights and pools travel as `train.part` messages, as base-sized ones do
        superlink={"artifact_part_mib": 1 / 16},
    )
    record = RunRecord(fed)
    with fed:
        fed.setup()
        fed.start_all()
        intruder = _start_unenrolled_site(fed, site_data_root / "ct")
        try:
            state = fed.wait_until(lambda s: s["stages"][0]["status"] == "done", 240, "stage 1")
            record.stage1_sha_before_kill = state["stages"][0]["artifact_sha256"]
            record.flower_runs_before_restart = len(state["flower_run_ids"])
            record.metrics["coordinator"] = _scrape(fed.ports["coordinator_metrics"], 'bytes_in_total{site="A"}')
            fed.stop("coordinator", signal.SIGKILL)  # the coordinator host dies right after stage 1
            record.unenrolled_rc = intruder.wait(timeout=60)
            record.unenrolled_log = (fed.logs / "site-X.log").read_text(errors="replace")
        finally:
            if intruder.poll() is None:
                os.killpg(intruder.pid, signal.SIGKILL)
        fed.start_coordinator("--stay")
        _kill_site_supervisor(fed, "B", record)
        fed.wait_until(lambda s: s["stages"][2]["status"] == "running", 300, "stage 3 to start")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            pid, epoch = _stage_pid(fed, "C", 3)
            if pid and epoch >= 1:
                record.metrics["site-C"] = _scrape(fed.ports["C_metrics"])
                os.kill(pid, signal.SIGKILL)  # the stage process dies mid-training (e.g. the OOM killer)
                record.killed_stage_pid, record.killed_after_epoch = pid, epoch
                break
            time.sleep(0.2)
        state = fed.wait_until(lambda s: s["status"] in ("done", "failed"), 420, "the end of the run")
        record.wall_seconds = time.monotonic() - started
        if state["status"] == "done":
            record.evil = _run_evil_app(fed, state)
        yield record


def test_full_run_completes_with_verified_chain(run: RunRecord) -> None:
    state = run.fed.state()
    assert state["status"] == "done", state.get("error")
    assert [s["status"] for s in state["stages"]] == ["done", "done", "done"]
    assert [s["modality"] for s in state["stages"]] == ["ct", "mri", "pathology"]
    parent = None
    for stage in state["stages"]:
        artifact = read_artifact_dir(
            run.fed.layout.checkpoint(stage["index"]),
            public_key=load_public_key(run.fed.layout.enrolled_key(stage["site"])),
            require_signature=True,
        )
        assert artifact.sha256 == stage["artifact_sha256"]
        assert artifact.manifest.parent_sha256 == parent
        assert not artifact.manifest.contains_real_data
        parent = artifact.sha256
    final = run.fed.layout.root / state["final_model"]
    assert read_artifact_dir(final).sha256 == state["stages"][-1]["artifact_sha256"]
    assert run.wall_seconds < 600


def test_final_model_loads_with_invcoss_embed(run: RunRecord, site_data_root: Path, tmp_path: Path) -> None:
    final = run.fed.layout.root / run.fed.state()["final_model"]
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((site_data_root / "pathology").iterdir())[:2]:
        shutil.copy(path, images / path.name)
    out = tmp_path / "feats.npz"
    done = run_embed(final, images, "pathology", out)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    import numpy as np

    with np.load(out) as feats:
        assert feats["features"].shape[0] == 2
        assert np.isfinite(feats["features"]).all()


def test_every_stage_recorded_done_exactly_once(run: RunRecord) -> None:
    done = [e["stage"] for e in read_journal(run.fed.layout) if e["event"] == "stage_done"]
    assert sorted(done) == [1, 2, 3]


def test_restarted_coordinator_continues_at_stage_2(run: RunRecord) -> None:
    state = run.fed.state()
    assert state["stages"][0]["artifact_sha256"] == run.stage1_sha_before_kill
    assert state["stages"][0]["attempts"] == 1  # stage 1 was not sent again
    assert len(state["flower_run_ids"]) == run.flower_runs_before_restart + 1
    second_run = [e for e in read_journal(run.fed.layout) if e["event"] == "flower_run_submitted"][-1]
    sent_after_restart = [
        e["stage"]
        for e in read_journal(run.fed.layout)
        if e["event"] == "stage_sent" and e["time"] >= second_run["time"]
    ]
    assert sent_after_restart and min(sent_after_restart) == 2


def test_killed_stage_process_resumes_from_its_checkpoint(run: RunRecord) -> None:
    assert run.killed_stage_pid, "stage 3 finished before it could be interrupted"
    stage3 = run.fed.state()["stages"][2]
    assert stage3["attempts"] >= 2
    interrupted = ("restarted while running the stage", "went offline", "crashed or stopped responding")
    assert any(any(text in err for text in interrupted) for err in stage3["errors"]), stage3["errors"]
    resumed = [e for e in run.fed.site_events("C") if e.get("kind") == "stage_resumed" and e.get("stage") == 3]
    assert resumed and resumed[-1]["epoch"] >= run.killed_after_epoch


def test_hard_killed_site_client_leaves_nothing_running_and_its_restart_resumes_the_stage(run: RunRecord) -> None:
    assert run.site_b_killed_after_epoch, "stage 2 finished before site B's supervisor could be killed"
    # SuperNode, SuperExec and the stage process all stop with their supervisor (before: an orphaned SuperNode stayed
    # connected and kept the stage, and the restarted client could not start its own)
    assert len(run.site_b_tree) >= 3, run.site_b_tree
    assert run.site_b_survivors == []
    stage2 = run.fed.state()["stages"][1]
    assert stage2["status"] == "done" and stage2["attempts"] >= 2, stage2
    events = run.fed.site_events("B")
    resumed = [e for e in events if e.get("kind") == "stage_resumed" and e.get("stage") == 2]
    assert resumed and resumed[-1]["epoch"] >= run.site_b_killed_after_epoch
    log = " ".join((run.fed.logs / "site-B.log").read_text(errors="replace").split())
    assert log.count("connected to the coordinator") >= 2  # the restarted client connected again
    assert "exited unexpectedly" not in log  # and did not fight a leftover SuperNode for its port


def test_unenrolled_node_is_refused(run: RunRecord) -> None:
    assert run.unenrolled_rc == 3
    assert "refused to activate site X" in run.unenrolled_log
    superlink_log = (run.fed.layout.logs / "superlink.log").read_text(errors="replace")
    assert "No SuperNode found with the given public key" in superlink_log
    assert "X" not in {s["site"] for s in run.fed.state()["stages"]}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("modified", "does not match its manifest sha256"),
        ("replayed", "replayed older artifact: stage 1 where stage 2 was expected"),
        ("wrong_parent", "names parent 0000"),
    ],
)
def test_site_refuses_tampered_incoming_artifacts(run: RunRecord, name: str, expected: str) -> None:
    result = run.evil[name]
    assert result["status"] == "refused", result
    assert expected in result["error"], result["error"]
    assert result["files"] == ""


def test_coordinator_refuses_tampered_stage_artifacts(run: RunRecord) -> None:
    layout, state = run.fed.layout, run.fed.state()
    s1, s2 = state["stages"][0], state["stages"][1]
    key_b = load_public_key(layout.enrolled_key("B"))
    good = read_artifact_files(layout.checkpoint(2))
    expect = {"run_id": state["run_id"], "stage_index": 2, "parent_sha256": s1["artifact_sha256"], "site": "B"}
    assert verify_stage_artifact(good, public_key=key_b, **expect).sha256 == s2["artifact_sha256"]
    modified = dict(good)
    modified["stats.safetensors"] = modified["stats.safetensors"][:-1] + b"\x00"
    with pytest.raises(ArtifactError, match="modified or corrupt"):
        verify_stage_artifact(modified, public_key=key_b, **expect)
    with pytest.raises(ArtifactError, match="replayed older artifact"):
        verify_stage_artifact(
            read_artifact_files(layout.checkpoint(1)),
            public_key=load_public_key(layout.enrolled_key("A")),
            **{**expect, "site": "A"},
        )
    with pytest.raises(ArtifactError, match="names parent"):
        verify_stage_artifact(good, public_key=key_b, **{**expect, "parent_sha256": "f" * 64})
    with pytest.raises(ArtifactError, match="signature does not verify"):
        verify_stage_artifact(good, public_key=load_public_key(layout.enrolled_key("C")), **expect)


def test_metrics_served_during_the_run(run: RunRecord) -> None:
    coordinator = run.metrics["coordinator"]
    for name in (
        "invcoss_coordinator_stages_done",
        "invcoss_coordinator_bytes_in_total",
        "invcoss_coordinator_stage_seconds_bucket",
        "invcoss_coordinator_stage_retries_total",
    ):
        assert name in coordinator
    assert 'invcoss_coordinator_bytes_in_total{site="A"}' in coordinator
    site = run.metrics["site-C"]
    for name in (
        "invcoss_site_epoch",
        "invcoss_site_loss",
        "invcoss_site_images_per_second",
        "invcoss_site_inversion_progress",
        "invcoss_site_gate_blocked_total",
        "invcoss_site_bytes_in_total",
    ):
        assert name in site
    assert "invcoss_site_stage_running 1.0" in site


def test_audit_finds_no_real_image_tensor_in_any_outbound_message(run: RunRecord) -> None:
    """Independent of the sites' own audit command: hash what they hold and what left, intersect."""
    from invcoss_core.config import StageConfig
    from site_client.audit import AuditLog, array_digests, outbound_digests, real_data_digests, sha256_hex

    fed = run.fed
    real: set[str] = set()
    counts = {"files": 0, "images": 0, "samples": 0}
    for site in fed.sites:
        configs = [
            StageConfig.model_validate_json(p.read_text())
            for p in (fed.site_work(site.name) / "runs").glob("*/stage-*/stage-config.json")
        ]
        assert configs
        digests = real_data_digests(site.data_dir, site.modality, configs)
        real |= digests.digests
        counts["files"] += digests.files
        counts["images"] += digests.images
        counts["samples"] += digests.samples
    assert counts["files"] and counts["images"] and counts["samples"]
    logged: set[str] = set()
    entries = []
    for site in fed.sites:
        entries += AuditLog(fed.site_work(site.name) / "audit.jsonl").entries()
    logged = outbound_digests(entries)
    assert len(entries) >= 3
    # What the coordinator received must be exactly what the sites logged as sent.
    for stage in fed.state()["stages"]:
        for name, data in read_artifact_files(fed.layout.checkpoint(stage["index"])).items():
            assert sha256_hex(data) in logged
            rows, samples = array_digests(name, data)
            assert {r["sha256"] for r in rows} <= logged and set(samples) <= logged
    assert not (logged & real), "a real image, volume or training sample left a site"
    # The check is able to see a leak: a real training sample put into a pool would be found.
    sample = torch.zeros(1)
    assert sha256_hex(sample.numpy().tobytes()) not in real
    site = fed.sites[2]
    configs = [
        StageConfig.model_validate_json(p.read_text())
        for p in (fed.site_work(site.name) / "runs").glob("*/stage-*/stage-config.json")
    ]
    from invcoss_core.data import load_site_dataset

    leaked = load_site_dataset(
        site.data_dir,
        site.modality,
        configs[0].model.spec(site.modality),
        configs[0].data,
        split="train",
        seed=configs[0].seed,
    ).tensors()[:1]
    _, pool_digests = array_digests("synthetic.safetensors", _pool_file(leaked))
    assert set(pool_digests) & real


def _pool_file(images: torch.Tensor) -> bytes:
    from safetensors.torch import save

    return save({"pathology": images.to(torch.float16).contiguous()})
