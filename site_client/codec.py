"""The site's only Flower-types module: stage requests and replies ↔ Flower messages.

The wire schema (record names, fields, version, the plain request and reply types) is `invcoss_core.common.protocol`;
`server/codec.py` is the coordinator's half. Artifact files travel as raw bytes in uint8 Arrays of stype
``invcoss.file``; nothing is unpickled, and files are parsed only by `invcoss_core.artifact.decode_artifact`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from invcoss_core.common.protocol import (
    ARTIFACT_RECORD,
    FILE_STYPE,
    METRICS_RECORD,
    PART_MESSAGE,
    PART_RECORD,
    PAYLOAD_RECORD,
    PROTOCOL_VERSION,
    QUERY_MESSAGE,
    RECEIPT_RECORD,
    RESULT_RECORD,
    SITE_RECORD,
    STAGE_MESSAGE,
    STAGE_RECORD,
    STEP_RECORD,
    PartRequest,
    ProtocolError,
    StageReply,
    StageRequest,
    StepReply,
    StepRequest,
    check_file_array,
    check_payload_names,
    metric_fields,
    parse_part_fields,
    parse_parted_fields,
    parse_stage_fields,
    parse_step_fields,
    payload_bytes,
    result_fields,
    site_fields,
    step_result_fields,
)
from site_client.parts import read_transfer

__all__ = [
    "ARTIFACT_RECORD",
    "FILE_STYPE",
    "METRICS_RECORD",
    "PART_MESSAGE",
    "PROTOCOL_VERSION",
    "QUERY_MESSAGE",
    "RESULT_RECORD",
    "SITE_RECORD",
    "STAGE_MESSAGE",
    "STAGE_RECORD",
    "OutboundMessage",
    "ProtocolError",
    "StageReply",
    "StageRequest",
    "build_part_reply",
    "build_site_reply",
    "build_stage_reply",
    "build_step_reply",
    "message_id",
    "parse_part_request",
    "parse_stage_request",
    "parse_step_request",
    "request_bytes",
]


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
        return payload_bytes(self.arrays)


def _files(record: ArrayRecord) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for name, array in record.items():
        check_file_array(name, array.stype, array.dtype, tuple(array.shape), len(array.data))
        files[name] = bytes(array.data)
    return files


def parse_stage_request(message: Message, incoming: Path | None = None) -> StageRequest:
    """Decode a `train.stage` message, with the files that travelled ahead of it as `train.part` messages.

    Args:
        incoming: the site's folder of part transfers (`store_part`); None refuses a message that names parts.
    Raises:
        ProtocolError: when records are missing, malformed or of another protocol version, or parts are missing.
    """
    content = message.content
    if STAGE_RECORD not in content.config_records:
        raise ProtocolError("the stage request has no 'stage' record")
    fields = content.config_records[STAGE_RECORD]
    request = parse_stage_fields(fields)
    files = _files(content.array_records[ARTIFACT_RECORD]) if ARTIFACT_RECORD in content.array_records else {}
    transfer, parted = parse_parted_fields(fields)
    if parted:
        if incoming is None:
            raise ProtocolError("the stage request names artifact parts but this receiver keeps none")
        overlap = sorted(set(parted) & set(files))
        if overlap:
            raise ProtocolError(f"files {overlap} travelled both inline and as parts")
        files.update(read_transfer(incoming, transfer, parted))
    return dataclasses.replace(request, files=files)


def parse_part_request(message: Message) -> PartRequest:
    """Decode a `train.part` message: one slice of one artifact file.

    Raises:
        ProtocolError: when records are missing or malformed, or the slice lies outside its file.
    """
    content = message.content
    if PART_RECORD not in content.config_records or ARTIFACT_RECORD not in content.array_records:
        raise ProtocolError("the part message has no 'part' or 'artifact' record")
    slices = _files(content.array_records[ARTIFACT_RECORD])
    if len(slices) != 1:
        raise ProtocolError(f"a part message carries one slice, not {len(slices)}")
    ((name, data),) = slices.items()
    part = parse_part_fields(content.config_records[PART_RECORD], data)
    if part.file != name:
        raise ProtocolError(f"the part record names {part.file}, its slice {name}")
    return part


def build_part_reply(request_message: Message, part: PartRequest | None, error: str = "") -> OutboundMessage:
    """The acknowledgement of a part (what arrived, or why it was refused); it carries no array."""
    ack: dict[str, Any] = {"ok": part is not None and not error, "error": error}
    if part is not None:
        ack.update(transfer=part.transfer, file=part.file, index=part.index, received=len(part.data))
    content = RecordDict({RESULT_RECORD: ConfigRecord(ack)})
    return OutboundMessage(
        Message(content, reply_to=request_message),
        "part_ack" if ack["ok"] else "part_refused",
        {},
        request_message.metadata.message_id,
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


def build_stage_reply(request_message: Message, reply: StageReply) -> OutboundMessage:
    """The reply to a stage request (artifact files, result, metrics)."""
    content = RecordDict(
        {
            ARTIFACT_RECORD: _file_record(reply.files),
            RESULT_RECORD: ConfigRecord(result_fields(reply)),
            METRICS_RECORD: MetricRecord(metric_fields(reply)),
        }
    )
    kind = "stage_reply" if reply.ok else f"stage_{reply.status}"
    return OutboundMessage(
        Message(content, reply_to=request_message), kind, dict(reply.files), request_message.metadata.message_id
    )


def parse_step_request(message: Message) -> StepRequest:
    """Decode a consortium step message (`train.round`, `query.stats`, `train.invert`, `query.gate`, ...).

    Raises:
        ProtocolError: when records are missing, malformed or of another protocol version.
    """
    content = message.content
    if STEP_RECORD not in content.config_records:
        raise ProtocolError("the consortium request has no 'step' record")
    request = parse_step_fields(content.config_records[STEP_RECORD])
    records = content.array_records
    files = _files(records[ARTIFACT_RECORD]) if ARTIFACT_RECORD in records else {}
    payload = _files(records[PAYLOAD_RECORD]) if PAYLOAD_RECORD in records else {}
    check_payload_names(payload)
    return dataclasses.replace(request, files=files, payload=payload)


def build_step_reply(request_message: Message, reply: StepReply, step: str) -> OutboundMessage:
    """The reply to a consortium step: payload (weights, statistics or candidates), artifact, signed receipt.

    No real image is ever in `reply`: the site runner builds it from model outputs only, and the audit log
    records every array before the message leaves.
    """
    content = RecordDict(
        {
            PAYLOAD_RECORD: _file_record(reply.payload),
            ARTIFACT_RECORD: _file_record(reply.files),
            RECEIPT_RECORD: ConfigRecord(step_result_fields(reply)),
        }
    )
    kind = f"{step}_reply" if reply.ok else f"{step}_{reply.status}"
    arrays = {**{f"payload/{k}": v for k, v in reply.payload.items()}, **reply.files}
    return OutboundMessage(
        Message(content, reply_to=request_message), kind, arrays, request_message.metadata.message_id
    )


def build_site_reply(request_message: Message, site: str, modality: str) -> OutboundMessage:
    """The reply to `query.site`: the site's name and modality (no data, no counts of patients)."""
    content = RecordDict({SITE_RECORD: ConfigRecord(site_fields(site, modality))})
    return OutboundMessage(
        Message(content, reply_to=request_message), "site_info", {}, request_message.metadata.message_id
    )


def message_id(message: Message) -> str:
    """The id of an incoming message."""
    return str(message.metadata.message_id)
