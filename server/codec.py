"""The coordinator's only Flower-types module: artifacts and stage requests ↔ Flower messages, and the Grid adapter.

Wire protocol (version 1; `site_client/codec.py` is the other half, a test checks both agree):

* ``train.stage`` request: ``artifact`` ArrayRecord {file name: raw file bytes as a uint8 Array with stype
  ``invcoss.file``} holding the parent artifact (empty for stage 1) and ``stage`` ConfigRecord with run_id,
  stage_index, site, modality, profile, settings (JSON StageConfig overrides), attempt, and what the site needs to
  verify the parent: parent_sha256, parent_site, parent_parent_sha256 and parent_public_key (the producing site's
  enrolled OpenSSH key).
* reply: ``artifact`` (the new artifact's files), ``result`` ConfigRecord (status ok / refused / failed, error,
  artifact_sha256, reused, resumed_from_epoch) and ``metrics`` MetricRecord (epoch_losses, seconds, ...).
* ``query.site`` → ``site`` ConfigRecord (site, modality).

Nothing is pickled: files travel as raw bytes and are parsed by `invcoss_core.artifact.decode_artifact`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

logger = logging.getLogger(__name__)

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
    """What the coordinator asks a site to do in one stage."""

    run_id: str
    stage_index: int
    site: str
    modality: str | None
    profile: str
    settings: dict[str, Any]  # StageConfig overrides of the plan
    attempt: int
    parent_sha256: str | None = None
    parent_site: str | None = None
    parent_parent_sha256: str | None = None
    parent_public_key: str | None = None  # OpenSSH public key of the producing site


@dataclass(frozen=True)
class StageReply:
    """A site's answer to a stage request."""

    status: str  # "ok", "refused" (verification / policy) or "failed" (the stage could not run)
    error: str
    files: dict[str, bytes]
    artifact_sha256: str | None
    reused: bool = False
    resumed_from_epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    epoch_losses: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class Received:
    """One reply pulled from the SuperLink: a stage reply, or a transport-level error."""

    reply_to: str
    reply: StageReply | None
    error: str | None  # Flower error (node unavailable, ClientApp exception, ttl expired)


@dataclass(frozen=True)
class NodeView:
    """What the coordinator needs to know about a connected SuperNode."""

    node_id: int
    name: str
    online: bool
    last_activated_at: str
    public_key: bytes


def files_to_record(files: Mapping[str, bytes]) -> ArrayRecord:
    """An ArrayRecord holding each file's raw bytes as a uint8 Array (chunked and hashed by Flower)."""
    record = ArrayRecord()
    for name in sorted(files):
        data = bytes(files[name])
        record[name] = Array(dtype="uint8", shape=(len(data),), stype=FILE_STYPE, data=data)
    return record


def record_to_files(record: ArrayRecord) -> dict[str, bytes]:
    """The files of an artifact ArrayRecord.

    Raises:
        ProtocolError: for an Array that is not a raw file.
    """
    files: dict[str, bytes] = {}
    for name, array in record.items():
        if array.stype != FILE_STYPE or array.dtype != "uint8" or tuple(array.shape) != (len(array.data),):
            raise ProtocolError(f"array {name!r} is not an artifact file (stype {array.stype!r})")
        files[name] = bytes(array.data)
    return files


def payload_bytes(files: Mapping[str, bytes]) -> int:
    """Total artifact bytes of a message."""
    return sum(len(b) for b in files.values())


def build_stage_message(request: StageRequest, parent_files: Mapping[str, bytes], node_id: int, ttl: float) -> Message:
    """The `train.stage` message of one stage attempt."""
    stage = ConfigRecord(
        {
            "protocol": PROTOCOL_VERSION,
            "run_id": request.run_id,
            "stage_index": request.stage_index,
            "site": request.site,
            "modality": request.modality or "",
            "profile": request.profile,
            "settings": json.dumps(request.settings, sort_keys=True),
            "attempt": request.attempt,
            "parent_sha256": request.parent_sha256 or "",
            "parent_site": request.parent_site or "",
            "parent_parent_sha256": request.parent_parent_sha256 or "",
            "parent_public_key": request.parent_public_key or "",
        }
    )
    content = RecordDict({ARTIFACT_RECORD: files_to_record(parent_files), STAGE_RECORD: stage})
    return Message(
        content,
        dst_node_id=node_id,
        message_type=STAGE_MESSAGE,
        group_id=f"{request.run_id}/stage-{request.stage_index}",
        ttl=ttl,
    )


def _str(record: ConfigRecord, key: str) -> str:
    value = record.get(key, "")
    return value if isinstance(value, str) else str(value)


def parse_stage_reply(message: Message) -> StageReply:
    """Decode a site's reply to `train.stage`.

    Raises:
        ProtocolError: when records are missing or malformed.
    """
    content = message.content
    if RESULT_RECORD not in content.config_records:
        raise ProtocolError("the reply has no 'result' record")
    result = content.config_records[RESULT_RECORD]
    status = _str(result, "status")
    if status not in ("ok", "refused", "failed"):
        raise ProtocolError(f"unknown reply status {status!r}")
    files = record_to_files(content.array_records[ARTIFACT_RECORD]) if ARTIFACT_RECORD in content.array_records else {}
    metrics: dict[str, float] = {}
    losses: list[float] = []
    if METRICS_RECORD in content.metric_records:
        for key, value in content.metric_records[METRICS_RECORD].items():
            if isinstance(value, list):
                if key == "epoch_losses":
                    losses = [float(v) for v in value]
            else:
                metrics[key] = float(value)
    return StageReply(
        status=status,
        error=_str(result, "error"),
        files=files,
        artifact_sha256=_str(result, "artifact_sha256") or None,
        reused=bool(result.get("reused", False)),
        resumed_from_epoch=int(result.get("resumed_from_epoch", 0)),  # type: ignore[arg-type]
        metrics=metrics,
        epoch_losses=losses,
    )


# Flower's error codes (flwr.common.constant.ErrorCode) in operator terms.
_FLOWER_ERRORS = {
    1: "the site could not load its ClientApp (is invcoss installed on the site?)",
    2: "the site's ClientApp raised an exception",
    3: "the stage message expired or was lost (ttl, or the site was removed)",
    4: "the site's reply expired before the coordinator collected it",
    5: "the site went offline (missed heartbeats or was restarted) while the stage was in flight",
    7: "the site refused the app bundle",
    8: "the site's stage process crashed or stopped responding",
}


def _received(message: Message) -> Received:
    reply_to = message.metadata.reply_to_message_id
    if message.has_error():
        err = message.error
        meaning = _FLOWER_ERRORS.get(int(err.code), "transport error")
        return Received(reply_to, None, f"{meaning} [Flower error {err.code}: {err.reason}]")
    try:
        return Received(reply_to, parse_stage_reply(message), None)
    except ProtocolError as err:
        return Received(reply_to, None, f"malformed reply: {err}")


class FlowerGrid:
    """The coordinator's view of the Flower Grid: nodes, push a stage, pull replies (no Flower types leak out)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def nodes(self) -> list[NodeView]:
        """Every SuperNode the SuperLink knows, with its enrollment name and liveness."""
        return [
            NodeView(
                node_id=int(n.node_id),
                name=str(n.name),
                online=str(n.status) == "online",
                last_activated_at=str(n.last_activated_at),
                public_key=bytes(n.public_key),
            )
            for n in self._grid.get_nodes()
        ]

    def send_stage(self, node_id: int, request: StageRequest, parent_files: Mapping[str, bytes], ttl: float) -> str:
        """Push one stage request; returns its message id.

        Raises:
            ProtocolError: when the SuperLink did not accept the message.
        """
        message = build_stage_message(request, parent_files, node_id, ttl)
        ids = list(self._grid.push_messages([message]))
        if not ids or not ids[0]:
            raise ProtocolError(f"the SuperLink refused the stage {request.stage_index} message")
        return str(ids[0])

    def receive(self, message_ids: Collection[str]) -> list[Received]:
        """Replies that arrived for any of `message_ids` (non-blocking)."""
        if not message_ids:
            return []
        return [_received(m) for m in self._grid.pull_messages(list(message_ids))]


def describe_nodes(nodes: Iterable[NodeView]) -> str:
    """One line listing nodes by name and status, for logs."""
    return ", ".join(f"{n.name or n.node_id}:{'online' if n.online else 'offline'}" for n in nodes) or "none"
