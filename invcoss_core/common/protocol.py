"""The hand-off wire schema: the message layout of DESIGN §4's artifact on the wire, with no Flower import.

Protocol version 1. Each side's codec (`server/codec.py`, `site_client/codec.py`) turns these plain values into
Flower records and back; everything else about the protocol — names, fields, defaults and checks — is here, so
the two halves cannot drift apart.

* ``train.stage`` request: ``artifact`` record {file name: raw file bytes as a uint8 array with stype
  ``invcoss.file``} holding the parent artifact (empty for stage 1) and ``stage`` config record (`stage_fields`)
  with run_id, stage_index, site, modality, profile, settings (JSON StageConfig overrides), attempt, and what the
  site needs to verify the parent: parent_sha256, parent_site, parent_parent_sha256 and parent_public_key (the
  producing site's enrolled OpenSSH key).
* reply: ``artifact`` (the new artifact's files), ``result`` config record (`result_fields`: status ok / refused /
  failed, error, artifact_sha256, reused, resumed_from_epoch) and ``metrics`` metric record (`metric_fields`:
  epoch_losses, seconds, ...).
* ``query.site`` → ``site`` config record (`site_fields`: site, modality).

Nothing is pickled: files travel as raw bytes and are parsed by `invcoss_core.artifact.decode_artifact`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ARTIFACT_RECORD",
    "CANDIDATES_FILE",
    "FILE_STYPE",
    "MAX_PARTED_FILE_BYTES",
    "METRICS_RECORD",
    "PART_BYTES",
    "PART_MESSAGE",
    "PART_RECORD",
    "PAYLOAD_FILES",
    "PAYLOAD_RECORD",
    "PROTOCOL_VERSION",
    "QUERY_MESSAGE",
    "RECEIPT_RECORD",
    "REPLY_STATUSES",
    "RESULT_RECORD",
    "SITE_RECORD",
    "STAGE_MESSAGE",
    "STAGE_RECORD",
    "STATS_FILE",
    "STEPS",
    "STEP_MESSAGES",
    "STEP_RECORD",
    "WEIGHTS_FILE",
    "PartRequest",
    "ProtocolError",
    "Receipt",
    "StageReply",
    "StageRequest",
    "StepReply",
    "StepRequest",
    "check_file_array",
    "check_parted_file",
    "check_payload_names",
    "check_transfer",
    "metric_fields",
    "parse_part_fields",
    "parse_parted_fields",
    "parse_reply",
    "parse_stage_fields",
    "parse_step_fields",
    "parse_step_result",
    "part_fields",
    "parted_fields",
    "payload_bytes",
    "payload_digest",
    "plan_parts",
    "result_fields",
    "site_fields",
    "stage_fields",
    "step_fields",
    "step_result_fields",
]

PROTOCOL_VERSION = 1
FILE_STYPE = "invcoss.file"
STAGE_MESSAGE = "train.stage"
QUERY_MESSAGE = "query.site"
ARTIFACT_RECORD = "artifact"
STAGE_RECORD = "stage"
RESULT_RECORD = "result"
METRICS_RECORD = "metrics"
SITE_RECORD = "site"
REPLY_STATUSES = ("ok", "refused", "failed")


class ProtocolError(ValueError):
    """A message does not follow the InvCoSS wire protocol."""


@dataclass(frozen=True)
class StageRequest:
    """What the coordinator asks a site to do in one stage (a `train.stage` message in plain Python types)."""

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
    files: dict[str, bytes] = field(default_factory=dict)  # the parent artifact as received (empty for stage 1)


@dataclass(frozen=True)
class StageReply:
    """A site's answer to a stage request."""

    status: str  # "ok", "refused" (verification / policy) or "failed" (the stage could not run)
    error: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    artifact_sha256: str | None = None
    reused: bool = False
    resumed_from_epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    epoch_losses: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def payload_bytes(files: Mapping[str, bytes]) -> int:
    """Total artifact bytes of a message."""
    return sum(len(b) for b in files.values())


def check_file_array(name: str, stype: str, dtype: str, shape: tuple[int, ...], size: int) -> None:
    """Accept only an array that is one raw artifact file: stype `invcoss.file`, uint8, shape (size,).

    Raises:
        ProtocolError: for any other array (e.g. a tensor someone tries to slip through).
    """
    if stype != FILE_STYPE or dtype != "uint8" or shape != (size,):
        raise ProtocolError(f"array {name!r} is not an artifact file (stype {stype!r})")


def stage_fields(request: StageRequest) -> dict[str, Any]:
    """The ``stage`` config record of a `train.stage` request (absent values travel as empty strings)."""
    return {
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


def _opt(fields: Mapping[str, Any], key: str) -> str | None:
    value = fields.get(key, "")
    return str(value) if value not in ("", None) else None


def _str(fields: Mapping[str, Any], key: str) -> str:
    value = fields.get(key, "")
    return value if isinstance(value, str) else str(value)


def parse_stage_fields(fields: Mapping[str, Any]) -> StageRequest:
    """Decode a ``stage`` config record into a StageRequest (the codec adds the parent artifact's files).

    Raises:
        ProtocolError: for another protocol version or malformed fields.
    """
    if fields.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {fields.get('protocol')!r} is not {PROTOCOL_VERSION}; update invcoss on this site"
        )
    try:
        settings = json.loads(str(fields.get("settings", "{}")))
        stage_index = int(fields["stage_index"])
        attempt = int(fields.get("attempt", 1))
    except (KeyError, TypeError, ValueError) as err:
        raise ProtocolError(f"malformed stage record: {err}") from None
    if not isinstance(settings, dict):
        raise ProtocolError("stage settings must be a JSON object")
    return StageRequest(
        run_id=str(fields.get("run_id", "")),
        stage_index=stage_index,
        site=str(fields.get("site", "")),
        modality=_opt(fields, "modality"),
        profile=str(fields.get("profile", "tiny")),
        settings=settings,
        attempt=attempt,
        parent_sha256=_opt(fields, "parent_sha256"),
        parent_site=_opt(fields, "parent_site"),
        parent_parent_sha256=_opt(fields, "parent_parent_sha256"),
        parent_public_key=_opt(fields, "parent_public_key"),
    )


def result_fields(reply: StageReply) -> dict[str, Any]:
    """The ``result`` config record of a stage reply."""
    return {
        "protocol": PROTOCOL_VERSION,
        "status": reply.status,
        "error": reply.error,
        "artifact_sha256": reply.artifact_sha256 or "",
        "reused": reply.reused,
        "resumed_from_epoch": reply.resumed_from_epoch,
    }


def metric_fields(reply: StageReply) -> dict[str, Any]:
    """The ``metrics`` metric record of a stage reply (scalar metrics, plus `epoch_losses` when there are any)."""
    metrics: dict[str, Any] = {k: float(v) for k, v in reply.metrics.items()}
    if reply.epoch_losses:
        metrics["epoch_losses"] = [float(x) for x in reply.epoch_losses]
    return metrics


def parse_reply(result: Mapping[str, Any], metrics: Mapping[str, Any]) -> StageReply:
    """Decode a reply's ``result`` and ``metrics`` records into a StageReply (the codec adds the artifact's files).

    Raises:
        ProtocolError: for an unknown status.
    """
    status = _str(result, "status")
    if status not in REPLY_STATUSES:
        raise ProtocolError(f"unknown reply status {status!r}")
    scalars: dict[str, float] = {}
    losses: list[float] = []
    for key, value in metrics.items():
        if isinstance(value, list):
            if key == "epoch_losses":
                losses = [float(v) for v in value]
        else:
            scalars[key] = float(value)
    return StageReply(
        status=status,
        error=_str(result, "error"),
        artifact_sha256=_str(result, "artifact_sha256") or None,
        reused=bool(result.get("reused", False)),
        resumed_from_epoch=int(result.get("resumed_from_epoch", 0)),
        metrics=scalars,
        epoch_losses=losses,
    )


def site_fields(site: str, modality: str) -> dict[str, Any]:
    """The ``site`` config record of a `query.site` reply: the site's name and modality (nothing about its data)."""
    return {"protocol": PROTOCOL_VERSION, "site": site, "modality": modality}


# --- consortium stages (DESIGN §7) ----------------------------------------------------------------------------
#
# A consortium stage is a sequence of steps, each one message per site: ``train.round`` (FedAvg rounds),
# ``query.stats`` (sufficient statistics), ``train.invert`` (the inversion site's candidates), ``query.gate``
# (every other site's verdicts) and ``train.finalize`` (the inversion site signs the artifact). A request carries
# ``step`` (config record, `step_fields`), ``payload`` (the step's inputs as raw safetensors files: weights,
# statistics, candidates) and ``artifact`` (the parent artifact, until the site confirmed it holds it). A reply
# carries ``payload`` (the step's outputs), ``artifact`` (finalize only) and ``receipt``: a JSON document naming
# run, stage, step, round, site, the sha256 of what the site started from and of every payload file, and its
# verdicts — signed with the site's key, so the coordinator accepts only what the enrolled site produced for this
# very step.

STEPS = ("round", "stats", "invert", "gate", "finalize")
STEP_MESSAGES = {
    "round": "train.round",
    "stats": "query.stats",
    "invert": "train.invert",
    "gate": "query.gate",
    "finalize": "train.finalize",
}
STEP_RECORD = "step"
PAYLOAD_RECORD = "payload"
RECEIPT_RECORD = "receipt"
WEIGHTS_FILE = "weights.safetensors"
STATS_FILE = "stats.safetensors"
CANDIDATES_FILE = "candidates.safetensors"
PAYLOAD_FILES = (WEIGHTS_FILE, STATS_FILE, CANDIDATES_FILE)


@dataclass(frozen=True)
class StepRequest:
    """One consortium step asked of one site (a `train.round` / `query.stats` / ... message in plain types)."""

    step: str  # one of STEPS
    run_id: str
    stage_index: int
    site: str
    modality: str | None
    profile: str
    settings: dict[str, Any]
    attempt: int
    round: int = 0  # 1-based round of a `round` step
    rounds: int = 1
    local_steps: int | None = None
    local_epochs: int = 1
    num_images: int = 0  # candidates to synthesise (`invert`)
    verdicts: dict[str, list[bool]] = field(default_factory=dict)  # site -> per-candidate verdicts (`finalize`)
    parent_sha256: str | None = None
    parent_site: str | None = None
    parent_parent_sha256: str | None = None
    parent_public_key: str | None = None
    files: dict[str, bytes] = field(default_factory=dict)  # the parent artifact (empty once the site holds it)
    payload: dict[str, bytes] = field(default_factory=dict)  # the step's inputs

    def as_stage_request(self, files: Mapping[str, bytes] | None = None) -> StageRequest:
        """The stage-level fields (run, stage, site, settings, parent) as a StageRequest carrying `files`."""
        return StageRequest(
            run_id=self.run_id,
            stage_index=self.stage_index,
            site=self.site,
            modality=self.modality,
            profile=self.profile,
            settings=self.settings,
            attempt=self.attempt,
            parent_sha256=self.parent_sha256,
            parent_site=self.parent_site,
            parent_parent_sha256=self.parent_parent_sha256,
            parent_public_key=self.parent_public_key,
            files=dict(files or {}),
        )


@dataclass(frozen=True)
class Receipt:
    """What a site signs about one step it ran."""

    run_id: str
    stage_index: int
    step: str
    round: int
    site: str
    base_sha256: str  # sha256 of the request's payload the site started from (`payload_digest`)
    files: dict[str, str]  # reply payload file -> sha256
    num_examples: int = 0  # the site's training samples (FedAvg weight, candidate count)
    metrics: dict[str, float] = field(default_factory=dict)  # loss, seconds, tokens: no patient data
    verdicts: list[bool] = field(default_factory=list)  # `invert` / `gate`: pass (True) or block per candidate

    def to_bytes(self) -> bytes:
        """The canonical JSON that is signed."""
        return json.dumps({"protocol": PROTOCOL_VERSION, **self.__dict__}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Receipt:
        """Parse a receipt.

        Raises:
            ProtocolError: for malformed JSON, another protocol version or missing fields.
        """
        try:
            fields = json.loads(data)
            if fields.pop("protocol", None) != PROTOCOL_VERSION:
                raise ProtocolError(f"receipt of another protocol version; expected {PROTOCOL_VERSION}")
            receipt = cls(**fields)
        except (ValueError, TypeError) as err:
            raise ProtocolError(f"malformed receipt: {err}") from None
        if receipt.step not in STEPS or not all(isinstance(v, bool) for v in receipt.verdicts):
            raise ProtocolError("malformed receipt: unknown step or verdicts that are not booleans")
        return receipt


@dataclass(frozen=True)
class StepReply:
    """A site's answer to a consortium step."""

    status: str  # "ok", "refused" or "failed", as for stages
    error: str = ""
    payload: dict[str, bytes] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # the signed stage artifact (`finalize`)
    receipt: bytes = b""
    signature: bytes = b""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def payload_digest(payload: Mapping[str, bytes]) -> str:
    """sha256 over the sorted (name, sha256 of bytes) pairs of a payload: what a receipt's `base_sha256` names."""
    lines = "".join(f"{name}:{hashlib.sha256(payload[name]).hexdigest()}\n" for name in sorted(payload))
    return hashlib.sha256(lines.encode()).hexdigest()


def check_payload_names(payload: Mapping[str, bytes]) -> None:
    """Accept only the known payload file names.

    Raises:
        ProtocolError: for any other name.
    """
    unknown = sorted(set(payload) - set(PAYLOAD_FILES))
    if unknown:
        raise ProtocolError(f"unexpected payload files {unknown}")


def step_fields(request: StepRequest) -> dict[str, Any]:
    """The ``step`` config record of a consortium request: the stage fields (`stage_fields`) plus the step's."""
    return {
        **stage_fields(request.as_stage_request()),
        "step": request.step,
        "round": request.round,
        "rounds": request.rounds,
        "local_steps": request.local_steps or 0,
        "local_epochs": request.local_epochs,
        "num_images": request.num_images,
        "verdicts": json.dumps(request.verdicts, sort_keys=True),
    }


def parse_step_fields(fields: Mapping[str, Any]) -> StepRequest:
    """Decode a ``step`` config record (the codec adds the files and payload).

    Raises:
        ProtocolError: for another protocol version, an unknown step or malformed fields.
    """
    base = parse_stage_fields(fields)
    step = _str(fields, "step")
    if step not in STEPS:
        raise ProtocolError(f"unknown consortium step {step!r}")
    try:
        verdicts = json.loads(str(fields.get("verdicts", "{}")))
        numbers = {k: int(fields.get(k, d)) for k, d in (("round", 0), ("rounds", 1), ("local_steps", 0))}
        local_epochs, num_images = int(fields.get("local_epochs", 1)), int(fields.get("num_images", 0))
    except (TypeError, ValueError) as err:
        raise ProtocolError(f"malformed step record: {err}") from None
    if not isinstance(verdicts, dict) or not all(
        isinstance(v, list) and all(isinstance(x, bool) for x in v) for v in verdicts.values()
    ):
        raise ProtocolError("step verdicts must map site names to lists of booleans")
    return StepRequest(
        step=step,
        run_id=base.run_id,
        stage_index=base.stage_index,
        site=base.site,
        modality=base.modality,
        profile=base.profile,
        settings=base.settings,
        attempt=base.attempt,
        round=numbers["round"],
        rounds=max(1, numbers["rounds"]),
        local_steps=numbers["local_steps"] or None,
        local_epochs=max(1, local_epochs),
        num_images=max(0, num_images),
        verdicts={str(k): list(v) for k, v in verdicts.items()},
        parent_sha256=base.parent_sha256,
        parent_site=base.parent_site,
        parent_parent_sha256=base.parent_parent_sha256,
        parent_public_key=base.parent_public_key,
    )


def step_result_fields(reply: StepReply) -> dict[str, Any]:
    """The ``receipt`` config record of a step reply: status, error, the signed receipt and its signature."""
    return {
        "protocol": PROTOCOL_VERSION,
        "status": reply.status,
        "error": reply.error,
        "receipt": reply.receipt.decode(),
        "signature": reply.signature.hex(),
    }


def parse_step_result(fields: Mapping[str, Any]) -> StepReply:
    """Decode a step reply's ``receipt`` record (the codec adds payload and files).

    Raises:
        ProtocolError: for an unknown status or a malformed signature.
    """
    status = _str(fields, "status")
    if status not in REPLY_STATUSES:
        raise ProtocolError(f"unknown reply status {status!r}")
    try:
        signature = bytes.fromhex(_str(fields, "signature"))
    except ValueError:
        raise ProtocolError("the receipt signature is not hex") from None
    return StepReply(
        status=status, error=_str(fields, "error"), receipt=_str(fields, "receipt").encode(), signature=signature
    )


# Artifact parts (`train.part`). A Flower message is held whole, several times over, by every process it passes
# (measured at `base`: the receiving ClientApp peaked at 3.8x the 886 MB artifact). Files larger than the
# coordinator's part size therefore travel ahead of their `train.stage` message as `train.part` messages of at
# most that many bytes each: ``part`` config record (`part_fields`) and ``artifact`` record holding one slice
# of one file. The site writes each slice into a transfer folder and acknowledges it; the stage message then
# names the transfer and the parted files' sizes (stage record fields ``transfer`` and ``parted``) and the site
# reads them from that folder. Nothing is trusted for being parted: the assembled files go through the same
# `decode_artifact` verification (manifest signature, every file's sha256) as inline ones.
PART_MESSAGE = "train.part"
PART_RECORD = "part"
PART_BYTES = 256 << 20  # default part size: one slice per message (see docs/results/real-sizes/handoff.md)
_TRANSFER_ID = re.compile(r"^[0-9a-f]{32}$")
_PART_FILE = re.compile(r"^[a-z][a-z0-9_]{0,40}\.(safetensors|json|sig)$")
MAX_PARTED_FILE_BYTES = 8 << 30


@dataclass(frozen=True)
class PartRequest:
    """One slice of one artifact file on its way to a site ahead of the stage message that uses it."""

    run_id: str
    stage_index: int
    transfer: str  # 32 lowercase hex digits: one coordinator send of one artifact
    file: str  # artifact file name
    offset: int  # where the slice starts in the file
    size: int  # the whole file's bytes
    index: int  # 0-based part number in the transfer
    count: int  # parts in the transfer
    data: bytes = b""


def plan_parts(sizes: Mapping[str, int], part_bytes: int) -> tuple[list[str], list[tuple[str, int, int]]]:
    """Split an artifact into files sent inline and slices sent ahead as parts.

    Args:
        sizes: file name -> bytes.
        part_bytes: largest slice; files of at most this size stay inline.
    Returns:
        (names of the inline files, [(file name, offset, length)] in sending order).
    Raises:
        ValueError: for a part size below 1 byte.
    """
    if part_bytes < 1:
        raise ValueError(f"part size must be at least 1 byte, not {part_bytes}")
    inline: list[str] = []
    slices: list[tuple[str, int, int]] = []
    for name in sorted(sizes):
        size = sizes[name]
        if size <= part_bytes:
            inline.append(name)
            continue
        slices.extend((name, offset, min(part_bytes, size - offset)) for offset in range(0, size, part_bytes))
    return inline, slices


def part_fields(part: PartRequest) -> dict[str, Any]:
    """The ``part`` config record of a `train.part` message (the slice travels in the ``artifact`` record)."""
    return {
        "protocol": PROTOCOL_VERSION,
        "run_id": part.run_id,
        "stage_index": part.stage_index,
        "transfer": part.transfer,
        "file": part.file,
        "offset": part.offset,
        "size": part.size,
        "index": part.index,
        "count": part.count,
    }


def parse_part_fields(fields: Mapping[str, Any], data: bytes) -> PartRequest:
    """Decode and bound-check a ``part`` record and its slice.

    Raises:
        ProtocolError: for another protocol version, a malformed transfer id or file name, or a slice outside its
            file.
    """
    if fields.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {fields.get('protocol')!r} is not {PROTOCOL_VERSION}; update invcoss on this site"
        )
    try:
        part = PartRequest(
            run_id=str(fields["run_id"]),
            stage_index=int(fields["stage_index"]),
            transfer=str(fields["transfer"]),
            file=str(fields["file"]),
            offset=int(fields["offset"]),
            size=int(fields["size"]),
            index=int(fields["index"]),
            count=int(fields["count"]),
            data=data,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ProtocolError(f"malformed part record: {err}") from None
    check_transfer(part.transfer)
    check_parted_file(part.file, part.size)
    if part.offset < 0 or part.offset + len(part.data) > part.size or not 0 <= part.index < part.count:
        raise ProtocolError(
            f"part {part.index}/{part.count} of {part.file}: bytes {part.offset}..{part.offset + len(part.data)} "
            f"lie outside the file's {part.size} bytes"
        )
    return part


def check_transfer(transfer: str) -> None:
    """Accept only a transfer id that is safe as a folder name (32 lowercase hex digits).

    Raises:
        ProtocolError: otherwise.
    """
    if not _TRANSFER_ID.match(transfer):
        raise ProtocolError(f"transfer id {transfer!r} is not 32 lowercase hex digits")


def check_parted_file(name: str, size: int) -> None:
    """Accept only an artifact file name (no path) and a size within the artifact limits.

    Raises:
        ProtocolError: otherwise.
    """
    if not _PART_FILE.match(name) or not 0 <= size <= MAX_PARTED_FILE_BYTES:
        raise ProtocolError(f"parted file {name!r} of {size} bytes is not an artifact file")


def parted_fields(transfer: str, parted: Mapping[str, int]) -> dict[str, Any]:
    """The stage record fields naming a transfer's parted files (empty values when nothing was parted)."""
    return {"transfer": transfer, "parted": json.dumps(dict(sorted(parted.items()))) if parted else ""}


def parse_parted_fields(fields: Mapping[str, Any]) -> tuple[str, dict[str, int]]:
    """(transfer id, {file: bytes}) of a stage record; ("", {}) when the whole artifact travelled inline.

    Raises:
        ProtocolError: for a malformed transfer id or file list.
    """
    transfer = str(fields.get("transfer", ""))
    raw = str(fields.get("parted", ""))
    if not transfer and not raw:
        return "", {}
    check_transfer(transfer)
    try:
        parted = {str(k): int(v) for k, v in json.loads(raw).items()}
    except (AttributeError, TypeError, ValueError) as err:
        raise ProtocolError(f"malformed parted file list: {err}") from None
    for name, size in parted.items():
        check_parted_file(name, size)
    return transfer, parted
