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

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ARTIFACT_RECORD",
    "FILE_STYPE",
    "METRICS_RECORD",
    "PROTOCOL_VERSION",
    "QUERY_MESSAGE",
    "REPLY_STATUSES",
    "RESULT_RECORD",
    "SITE_RECORD",
    "STAGE_MESSAGE",
    "STAGE_RECORD",
    "ProtocolError",
    "StageReply",
    "StageRequest",
    "check_file_array",
    "metric_fields",
    "parse_reply",
    "parse_stage_fields",
    "payload_bytes",
    "result_fields",
    "site_fields",
    "stage_fields",
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
