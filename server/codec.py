"""The coordinator's only Flower-types module: stage requests and replies ↔ Flower messages, and the Grid adapter.

The wire schema (record names, fields, version, the plain request and reply types) is
`invcoss_core.common.protocol`; `site_client/codec.py` is the other half. This module only turns it into Flower records
(`ArrayRecord`, `ConfigRecord`, `Message`) and back, and wraps the ServerApp's Grid.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass

import httpx
import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from invcoss_core.artifact import file_sizes, file_slice
from invcoss_core.common.protocol import (
    ARTIFACT_RECORD,
    FILE_STYPE,
    METRICS_RECORD,
    PART_BYTES,
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
    STEP_MESSAGES,
    STEP_RECORD,
    PartRequest,
    ProtocolError,
    StageReply,
    StageRequest,
    StepReply,
    StepRequest,
    check_file_array,
    check_payload_names,
    parse_reply,
    parse_step_result,
    part_fields,
    parted_fields,
    plan_parts,
    stage_fields,
    step_fields,
)

__all__ = [
    "ARTIFACT_RECORD",
    "FILE_STYPE",
    "METRICS_RECORD",
    "PROTOCOL_VERSION",
    "QUERY_MESSAGE",
    "RESULT_RECORD",
    "SITE_RECORD",
    "STAGE_MESSAGE",
    "STAGE_RECORD",
    "FlowerGrid",
    "NodeView",
    "ProtocolError",
    "Received",
    "StageReply",
    "StageRequest",
    "build_part_messages",
    "build_stage_message",
    "build_step_message",
    "describe_nodes",
    "fedavg",
    "files_to_record",
    "parse_stage_reply",
    "parse_step_reply",
    "record_to_files",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Received:
    """One reply pulled from the SuperLink: a stage reply, a consortium step reply, or a transport-level error."""

    reply_to: str
    reply: StageReply | None
    error: str | None  # Flower error (node unavailable, ClientApp exception, ttl expired)
    step: StepReply | None = None


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
        check_file_array(name, array.stype, array.dtype, tuple(array.shape), len(array.data))
        files[name] = bytes(array.data)
    return files


def build_stage_message(
    request: StageRequest,
    parent_files: Mapping[str, bytes],
    node_id: int,
    ttl: float,
    transfer: str = "",
    parted: Mapping[str, int] | None = None,
) -> Message:
    """The `train.stage` message of one stage attempt.

    Args:
        parent_files: the verified parent artifact's files that travel in this message.
        transfer: the id of the `train.part` messages that carried the other files ahead ("" for none).
        parted: name -> bytes of the files that travelled as parts.
    """
    fields = {**stage_fields(request), **parted_fields(transfer, parted or {})}
    content = RecordDict({ARTIFACT_RECORD: files_to_record(parent_files), STAGE_RECORD: ConfigRecord(fields)})
    return Message(
        content,
        dst_node_id=node_id,
        message_type=STAGE_MESSAGE,
        group_id=f"{request.run_id}/stage-{request.stage_index}",
        ttl=ttl,
    )


def build_part_messages(
    request: StageRequest, parent_files: Mapping[str, bytes], node_id: int, ttl: float, part_bytes: int
) -> Iterator[Message]:
    """The messages of one stage attempt, in sending order: `train.part` messages for the files above
    `part_bytes`, then the `train.stage` message naming them. `parent_files` may be an `ArtifactFiles` (read from
    disk a slice at a time).

    Each message is built only when the iterator reaches it, so that one slice at a time is copied into Flower
    records, and so that the stage message is created last: the SuperLink hands a node its messages in the order of
    their creation time (`created_at`, set when the Message is built), and the site reads the parts when the stage
    message arrives. Push each message as it comes.

    Raises:
        ValueError: for a part size below 1 byte.
    """
    sizes = file_sizes(parent_files)
    inline, slices = plan_parts(sizes, part_bytes)
    transfer = secrets.token_hex(16) if slices else ""
    parted = {name: sizes[name] for name, _, _ in slices}
    for index, (name, offset, length) in enumerate(slices):
        data = file_slice(parent_files, name, offset, length)
        part = PartRequest(
            run_id=request.run_id,
            stage_index=request.stage_index,
            transfer=transfer,
            file=name,
            offset=offset,
            size=sizes[name],
            index=index,
            count=len(slices),
        )
        record = ArrayRecord()
        record[name] = Array(dtype="uint8", shape=(length,), stype=FILE_STYPE, data=data)
        del data
        yield Message(
            RecordDict({ARTIFACT_RECORD: record, PART_RECORD: ConfigRecord(part_fields(part))}),
            dst_node_id=node_id,
            message_type=PART_MESSAGE,
            group_id=f"{request.run_id}/stage-{request.stage_index}/part-{index}",
            ttl=ttl,
        )
    yield build_stage_message(request, {n: parent_files[n] for n in inline}, node_id, ttl, transfer, parted)


def parse_stage_reply(message: Message) -> StageReply:
    """Decode a site's reply to `train.stage`.

    Raises:
        ProtocolError: when records are missing or malformed.
    """
    content = message.content
    if RESULT_RECORD not in content.config_records:
        raise ProtocolError("the reply has no 'result' record")
    reply = parse_reply(content.config_records[RESULT_RECORD], content.metric_records.get(METRICS_RECORD, {}))
    files = record_to_files(content.array_records[ARTIFACT_RECORD]) if ARTIFACT_RECORD in content.array_records else {}
    return dataclasses.replace(reply, files=files)


def build_step_message(request: StepRequest, node_id: int, ttl: float) -> Message:
    """The message of one consortium step for one site (its type names the step, e.g. `train.round`)."""
    content = RecordDict(
        {
            ARTIFACT_RECORD: files_to_record(request.files),
            PAYLOAD_RECORD: files_to_record(request.payload),
            STEP_RECORD: ConfigRecord(step_fields(request)),
        }
    )
    return Message(
        content,
        dst_node_id=node_id,
        message_type=STEP_MESSAGES[request.step],
        group_id=f"{request.run_id}/stage-{request.stage_index}/{request.step}-{request.round}",
        ttl=ttl,
    )


def parse_step_reply(message: Message) -> StepReply:
    """Decode a site's reply to a consortium step (receipt, payload, artifact).

    Raises:
        ProtocolError: when records are missing or malformed.
    """
    content = message.content
    if RECEIPT_RECORD not in content.config_records:
        raise ProtocolError("the reply has no 'receipt' record")
    reply = parse_step_result(content.config_records[RECEIPT_RECORD])
    records = content.array_records
    payload = record_to_files(records[PAYLOAD_RECORD]) if PAYLOAD_RECORD in records else {}
    check_payload_names(payload)
    files = record_to_files(records[ARTIFACT_RECORD]) if ARTIFACT_RECORD in records else {}
    return dataclasses.replace(reply, payload=payload, files=files)


FEDAVG_WEIGHT = "num-examples"


def fedavg(contributions: list[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """Flower's FedAvg aggregation (`aggregate_arrayrecords`) of (state dict, sample count) pairs.

    Each site's verified weights become an ArrayRecord beside a MetricRecord holding its sample count, exactly
    what Flower's `FedAvg.aggregate_train` averages; the result comes back as float32 CPU tensors with the
    first contribution's dtypes.

    Raises:
        ValueError: for no contributions, a non-positive total weight or mismatched keys.
    """
    if not contributions:
        raise ValueError("nothing to aggregate")
    keys = set(contributions[0][0])
    if any(set(weights) != keys for weights, _ in contributions):
        raise ValueError("the sites' weights do not have the same parameter names")
    if sum(n for _, n in contributions) <= 0:
        raise ValueError("the sites' sample counts add up to zero")
    records = [
        RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v.detach().cpu().float().numpy()) for k, v in weights.items()}),
                "metrics": MetricRecord({FEDAVG_WEIGHT: float(n)}),
            }
        )
        for weights, n in contributions
    ]
    averaged = aggregate_arrayrecords(records, FEDAVG_WEIGHT)
    reference = contributions[0][0]
    return {k: torch.from_numpy(np.ascontiguousarray(averaged[k].numpy())).to(reference[k].dtype) for k in reference}


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
        if RECEIPT_RECORD in message.content.config_records:
            return Received(reply_to, None, None, step=parse_step_reply(message))
        return Received(reply_to, parse_stage_reply(message), None)
    except ProtocolError as err:
        return Received(reply_to, None, f"malformed reply: {err}")


class FlowerGrid:
    """The coordinator's view of the Flower Grid: nodes, push a stage, pull replies (no Flower types leak out)."""

    def __init__(self, grid: Grid, part_bytes: int = PART_BYTES) -> None:
        self._grid = grid
        self._part_bytes = part_bytes
        self._parts_in_flight: set[str] = set()  # part acknowledgements not pulled yet

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
        part_ids: list[str] = []
        for message in build_part_messages(request, parent_files, node_id, ttl, self._part_bytes):
            ids = list(self._grid.push_messages([message]))
            if not ids or not ids[0]:
                what = "message" if message.metadata.message_type == STAGE_MESSAGE else f"artifact part {len(part_ids)}"
                raise ProtocolError(f"the SuperLink refused the stage {request.stage_index} {what}")
            part_ids.append(str(ids[0]))
            del message  # one slice held at a time
        self._parts_in_flight.update(part_ids[:-1])
        return part_ids[-1]

    def send_step(self, node_id: int, request: StepRequest, ttl: float) -> str:
        """Push one consortium step request; returns its message id.

        Raises:
            ProtocolError: when the SuperLink did not accept the message.
        """
        ids = list(self._grid.push_messages([build_step_message(request, node_id, ttl)]))
        if not ids or not ids[0]:
            raise ProtocolError(f"the SuperLink refused the {request.step} message of stage {request.stage_index}")
        return str(ids[0])

    def receive(self, message_ids: Collection[str]) -> list[Received]:
        """Replies that arrived for any of `message_ids` (non-blocking).

        Part acknowledgements are collected on the way and only logged: a part that did not arrive makes the
        stage message's reply a refusal naming the missing file, which the plan's retries already handle.
        """
        try:
            if self._parts_in_flight:
                for ack in self._grid.pull_messages(list(self._parts_in_flight)):
                    self._parts_in_flight.discard(str(ack.metadata.reply_to_message_id))
                    if ack.has_error():
                        logger.warning("an artifact part was not delivered: Flower error %s", ack.error.code)
            if not message_ids:
                return []
            return [_received(m) for m in self._grid.pull_messages(list(message_ids))]
        except httpx.HTTPStatusError as err:
            # Measured at `base`: while a big message's objects are written, the SuperLink's SQLite store can
            # answer "database is locked" (HTTP 500); the replies are still there at the next poll.
            if err.response.status_code < 500:
                raise
            logger.warning("the SuperLink could not answer a poll (HTTP %d); polling again", err.response.status_code)
            return []


def describe_nodes(nodes: Iterable[NodeView]) -> str:
    """One line listing nodes by name and status, for logs."""
    return ", ".join(f"{n.name or n.node_id}:{'online' if n.online else 'offline'}" for n in nodes) or "none"
