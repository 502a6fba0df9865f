"""The site's only Flower-types module: stage requests and replies ↔ Flower messages.

The wire protocol is described in `server/codec.py` (the coordinator's half); a test checks that both halves
use the same record names and version. Artifact files travel as raw bytes in uint8 Arrays of stype
``invcoss.file``; nothing is unpickled, and files are parsed only by `invcoss_core.artifact.decode_artifact`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

PROTOCOL_VERSION = 1
FILE_STYPE = "invcoss.file"
STAGE_MESSAGE = "train.stage"
QUERY_MESSAGE = "query.site"
ARTIFACT_RECORD = "artifact"
STAGE_RECORD = "stage"
RESULT_RECORD = "result"
METRICS_RECORD = "metrics"
SITE_RECORD = "site"


class ProtocolError(ValueError):
    """A message does not follow the InvCoSS wire protocol."""


@dataclass(frozen=True)
class StageRequest:
    """A `train.stage` request as the site sees it (plain Python types)."""

    run_id: str
    stage_index: int
    site: str
    modality: str | None
    profile: str
    settings: dict[str, Any]
    attempt: int
    parent_sha256: str | None
    parent_site: str | None
    parent_parent_sha256: str | None
    parent_public_key: str | None
    files: dict[str, bytes]  # the parent artifact (empty for stage 1)


@dataclass(frozen=True)
class StageResponse:
    """What the site answers to one stage request."""

    status: str  # "ok", "refused" or "failed"
    error: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    artifact_sha256: str | None = None
    reused: bool = False
    resumed_from_epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    epoch_losses: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class OutboundMessage:
    """A reply ready to leave the site, with the raw arrays it carries (for the audit log)."""

    message: Message
    kind: str
    arrays: dict[str, bytes]
    reply_to: str

    @property
    def message_id(self) -> str:
        """The reply's content-addressed id (Flower uses it as the message id)."""
        return str(self.message.object_id)

    @property
    def bytes(self) -> int:
        """Bytes of array payload."""
        return sum(len(b) for b in self.arrays.values())


def _opt(record: ConfigRecord, key: str) -> str | None:
    value = record.get(key, "")
    return str(value) if value not in ("", None) else None


def _files(record: ArrayRecord) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for name, array in record.items():
        if array.stype != FILE_STYPE or array.dtype != "uint8" or tuple(array.shape) != (len(array.data),):
            raise ProtocolError(f"array {name!r} is not an artifact file (stype {array.stype!r})")
        files[name] = bytes(array.data)
    return files


def parse_stage_request(message: Message) -> StageRequest:
    """Decode a `train.stage` message.

    Raises:
        ProtocolError: when records are missing, malformed or of another protocol version.
    """
    content = message.content
    if STAGE_RECORD not in content.config_records:
        raise ProtocolError("the stage request has no 'stage' record")
    stage = content.config_records[STAGE_RECORD]
    if stage.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {stage.get('protocol')!r} is not {PROTOCOL_VERSION}; update invcoss on this site"
        )
    try:
        settings = json.loads(str(stage.get("settings", "{}")))
        stage_index = int(stage["stage_index"])  # type: ignore[arg-type]
        attempt = int(stage.get("attempt", 1))  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as err:
        raise ProtocolError(f"malformed stage record: {err}") from None
    if not isinstance(settings, dict):
        raise ProtocolError("stage settings must be a JSON object")
    files = _files(content.array_records[ARTIFACT_RECORD]) if ARTIFACT_RECORD in content.array_records else {}
    return StageRequest(
        run_id=str(stage.get("run_id", "")),
        stage_index=stage_index,
        site=str(stage.get("site", "")),
        modality=_opt(stage, "modality"),
        profile=str(stage.get("profile", "tiny")),
        settings=settings,
        attempt=attempt,
        parent_sha256=_opt(stage, "parent_sha256"),
        parent_site=_opt(stage, "parent_site"),
        parent_parent_sha256=_opt(stage, "parent_parent_sha256"),
        parent_public_key=_opt(stage, "parent_public_key"),
        files=files,
    )


def request_bytes(message: Message) -> int:
    """Array payload bytes of an incoming message."""
    return sum(len(a.data) for record in message.content.array_records.values() for a in record.values())


def _file_record(files: Mapping[str, bytes]) -> ArrayRecord:
    record = ArrayRecord()
    for name in sorted(files):
        data = bytes(files[name])
        record[name] = Array(dtype="uint8", shape=(len(data),), stype=FILE_STYPE, data=data)
    return record


def build_stage_reply(request_message: Message, response: StageResponse) -> OutboundMessage:
    """The reply to a stage request (artifact files, result, metrics)."""
    result = ConfigRecord(
        {
            "protocol": PROTOCOL_VERSION,
            "status": response.status,
            "error": response.error,
            "artifact_sha256": response.artifact_sha256 or "",
            "reused": response.reused,
            "resumed_from_epoch": response.resumed_from_epoch,
        }
    )
    metrics: dict[str, Any] = {k: float(v) for k, v in response.metrics.items()}
    if response.epoch_losses:
        metrics["epoch_losses"] = [float(x) for x in response.epoch_losses]
    content = RecordDict(
        {
            ARTIFACT_RECORD: _file_record(response.files),
            RESULT_RECORD: result,
            METRICS_RECORD: MetricRecord(metrics),
        }
    )
    kind = "stage_reply" if response.status == "ok" else f"stage_{response.status}"
    return OutboundMessage(
        Message(content, reply_to=request_message), kind, dict(response.files), request_message.metadata.message_id
    )


def build_site_reply(request_message: Message, site: str, modality: str) -> OutboundMessage:
    """The reply to `query.site`: the site's name and modality (no data, no counts of patients)."""
    record = ConfigRecord({"protocol": PROTOCOL_VERSION, "site": site, "modality": modality})
    content = RecordDict({SITE_RECORD: record})
    return OutboundMessage(
        Message(content, reply_to=request_message), "site_info", {}, request_message.metadata.message_id
    )


def message_id(message: Message) -> str:
    """The id of an incoming message."""
    return str(message.metadata.message_id)
