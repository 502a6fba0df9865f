"""The ClientApp handlers called as Flower calls them: every reply is audited, refusals carry no artifact."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Context, RecordDict

import server.codec as coordinator
from invcoss_core.artifact import decode_artifact
from site_client.app import site_info, stage
from site_client.audit import AuditLog
from site_client.codec import STAGE_MESSAGE
from site_client.config import SiteConfig

FAST = {"replay": {"strategy": "none"}, "train": {"epochs": 1}, "data": {"samples_per_volume": 4}}


def _context(cfg: SiteConfig, toml: Path) -> Context:
    return Context(
        run_id=1, node_id=2, node_config={"site": "A", "config": str(toml)}, state=RecordDict(), run_config={}
    )


def _message(settings: dict, parent: dict | None = None) -> object:
    request = coordinator.StageRequest(
        run_id="run-1", stage_index=1, site="A", modality="pathology", profile="tiny", settings=settings, attempt=1
    )
    message = coordinator.build_stage_message(request, parent or {}, node_id=2, ttl=60)
    message.metadata.__dict__["_message_id"] = "incoming-1"
    return message


def test_stage_handler_replies_with_a_signed_artifact_and_audits_it(site_config: SiteConfig, site_key) -> None:
    toml = site_config.work_dir.parent / "site.toml"
    reply = stage(_message(FAST), _context(site_config, toml))
    parsed = coordinator.parse_stage_reply(reply)
    assert parsed.ok, parsed.error
    artifact = decode_artifact(parsed.files, public_key=site_key.public_key(), require_signature=True)
    assert artifact.sha256 == parsed.artifact_sha256
    (entry,) = AuditLog(site_config.work_dir / "audit.jsonl").entries()
    assert entry["kind"] == "stage_reply" and entry["reply_to"] == "incoming-1"
    assert entry["bytes"] == sum(len(b) for b in parsed.files.values())
    assert entry["message_id"] == reply.object_id
    kinds = [json.loads(x)["kind"] for x in (site_config.work_dir / "events.jsonl").read_text().splitlines()]
    assert kinds[0] == "message_in" and "stage_started" in kinds and kinds[-1] == "message_out"


def test_refused_request_is_replied_and_audited_without_files(site_config: SiteConfig) -> None:
    toml = site_config.work_dir.parent / "site.toml"
    reply = stage(_message({"replay": {"strategy": "real_buffer"}}), _context(site_config, toml))
    parsed = coordinator.parse_stage_reply(reply)
    assert parsed.status == "refused" and "real images off the site" in parsed.error and parsed.files == {}
    (entry,) = AuditLog(site_config.work_dir / "audit.jsonl").entries()
    assert entry["kind"] == "stage_refused" and entry["bytes"] == 0


def test_data_problems_do_not_leak_file_details(tmp_path: Path, site_config: SiteConfig) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg_path = site_config.work_dir.parent / "site.toml"
    text = cfg_path.read_text().replace(str(site_config.data_dir), str(empty))
    cfg_path.write_text(text)
    parsed = coordinator.parse_stage_reply(stage(_message(FAST), _context(site_config, cfg_path)))
    assert parsed.status == "failed"
    assert str(empty) not in parsed.error and "details in the site's log" in parsed.error


def test_site_query_answers_name_and_modality(site_config: SiteConfig) -> None:
    toml = site_config.work_dir.parent / "site.toml"
    from flwr.app import ConfigRecord, Message

    query = Message(RecordDict({"q": ConfigRecord({})}), dst_node_id=2, message_type="query.site")
    reply = site_info(query, _context(site_config, toml))
    assert dict(reply.content.config_records["site"]) == {"protocol": 1, "site": "A", "modality": "pathology"}
    assert AuditLog(site_config.work_dir / "audit.jsonl").entries()[0]["kind"] == "site_info"
    assert STAGE_MESSAGE == "train.stage"
