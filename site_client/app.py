"""The site's Flower ClientApp: `train.stage` runs one stage, `query.site` says who the site is, and the consortium
steps (`train.round`, `query.stats`, `train.invert`, `query.gate`, `train.finalize`) run one step of a stage that
several sites share.

A fresh process serves each message (Flower 1.42), so everything is read from the site config named in the
SuperNode's node config (`config="<site.toml>"`) and all state is on disk. Every reply is written to the audit
log before it is returned; refusals and failures are replied as such (with the reason), never as an artifact.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from invcoss_core.artifact import ArtifactError
from invcoss_core.common.processes import start_supervisor_watch
from invcoss_core.common.protocol import ProtocolError, StageReply, StepReply
from invcoss_core.common.signing import SigningKeyError, load_private_key
from invcoss_core.config import ConfigError
from invcoss_core.data import SiteDataError
from invcoss_core.training import StageError
from site_client.audit import AUDIT_FILE, AuditLog, privacy_fields
from site_client.codec import (
    OutboundMessage,
    build_part_reply,
    build_site_reply,
    build_stage_reply,
    build_step_reply,
    message_id,
    parse_part_request,
    parse_stage_request,
    parse_step_request,
    request_bytes,
)
from site_client.config import SiteConfig, load_site_config
from site_client.consortium import run_site_step
from site_client.metrics import SiteEvents
from site_client.parts import discard_other_transfers, store_part
from site_client.runner import RefusedError, run_site_stage

logger = logging.getLogger(__name__)

CONFIG_KEY = "config"
EVENTS_FILE = "events.jsonl"
INCOMING_DIR = "incoming"  # under the site's work dir: artifact parts until their stage message arrives

app = ClientApp()
ABANDONED_EXIT_CODE = 75  # the stage process stopped itself: its site supervisor is gone (EX_TEMPFAIL)


def _site_config(context: Context) -> SiteConfig:
    path = str(context.node_config.get(CONFIG_KEY, ""))
    if not path:
        raise ConfigError("the SuperNode was started without node config 'config' (start it with invcoss-client)")
    return load_site_config(Path(path), site=str(context.node_config.get("site", "")) or None)


def _configure_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("site_client", "invcoss_core"):
        package_logger = logging.getLogger(name)
        if not package_logger.handlers:
            package_logger.addHandler(handler)
        package_logger.setLevel(logging.INFO)
        package_logger.propagate = False


def _send(cfg: SiteConfig, events: SiteEvents, outbound: OutboundMessage, **extra: object) -> Message:
    """Audit-log a reply, count it, and hand it to Flower."""
    AuditLog(cfg.work_dir / AUDIT_FILE).record(
        kind=outbound.kind,
        message_id=outbound.message_id,
        reply_to=outbound.reply_to,
        arrays=outbound.arrays,
        extra=extra,
    )
    events.emit("message_out", message_kind=outbound.kind, bytes=outbound.bytes)
    return outbound.message


@app.query("site")
def site_info(msg: Message, context: Context) -> Message:
    """Answer with the site's name and modality."""
    cfg = _site_config(context)
    events = SiteEvents(cfg.work_dir / EVENTS_FILE)
    return _send(cfg, events, build_site_reply(msg, cfg.site, cfg.modality))


@app.train("part")
def artifact_part(msg: Message, context: Context) -> Message:
    """Store one slice of a big parent artifact ahead of its stage message and acknowledge it."""
    _configure_logging()
    cfg = _site_config(context)
    events = SiteEvents(cfg.work_dir / EVENTS_FILE)
    events.emit("message_in", bytes=request_bytes(msg), message_id=message_id(msg))
    try:
        part = parse_part_request(msg)
    except ProtocolError as err:
        logger.error("artifact part refused: %s", err)
        return _send(cfg, events, build_part_reply(msg, None, str(err)))
    incoming = cfg.work_dir / INCOMING_DIR
    if part.index == 0:
        discard_other_transfers(incoming, keep=part.transfer)
    try:
        store_part(incoming, part)
    except (ProtocolError, OSError) as err:  # may name local files: details stay in the site log
        logger.error("artifact part %d of %s not stored: %s", part.index, part.file, err)
        return _send(cfg, events, build_part_reply(msg, part, f"{type(err).__name__}: part not stored"))
    return _send(cfg, events, build_part_reply(msg, part), run_id=part.run_id, stage=part.stage_index)


@app.train("stage")
def stage(msg: Message, context: Context) -> Message:
    """Run one stage of the plan on this site's data and reply with the signed artifact (or the refusal)."""
    _configure_logging()
    cfg = _site_config(context)
    events = SiteEvents(cfg.work_dir / EVENTS_FILE)
    events.emit("message_in", bytes=request_bytes(msg), message_id=message_id(msg))
    started = time.perf_counter()
    stage_index = 0
    extra: dict[str, object] = {}
    finished = False

    def abandon(supervisor: int) -> None:
        if finished:  # the reply cannot reach the coordinator any more; the restarted site resends the same artifact
            logger.error(
                "this site's invcoss-client (pid %d) is gone: dropping stage %d's reply",
                supervisor,
                stage_index,
            )
        else:
            logger.error(
                "this site's invcoss-client (pid %d) is gone: stopping stage %d here; the restarted site resumes it "
                "from its last epoch checkpoint when the coordinator retries",
                supervisor,
                stage_index,
            )
            events.emit("stage_abandoned", stage=stage_index, supervisor_pid=supervisor)
        os._exit(ABANDONED_EXIT_CODE)  # like a crash: epoch checkpoints are whole files, the stage lock is freed

    # For the rest of this process's life, reply included: Flower's ClientApp process has no parent monitor and
    # would keep retrying to push its reply to a SuperNode that is gone. Flower starts one process per message, so
    # this is the process's only watch.
    start_supervisor_watch(abandon)
    try:
        request = parse_stage_request(msg, cfg.work_dir / INCOMING_DIR)
        stage_index = request.stage_index
        extra = {"run_id": request.run_id, "stage": stage_index, "attempt": request.attempt}
        events.emit("stage_started", stage=stage_index, attempt=request.attempt, run_id=request.run_id)
        logger.info("stage %d of run %s (attempt %d) received", stage_index, request.run_id, request.attempt)
        private_key = load_private_key(cfg.private_key)
        response = run_site_stage(cfg, request, private_key, events)
    except (RefusedError, ProtocolError) as err:
        logger.error("stage %d refused: %s", stage_index, err)
        response = StageReply(status="refused", error=str(err))
    except (SiteDataError, OSError) as err:  # may name local files: details stay in the site log
        logger.error("stage %d failed on site data: %s", stage_index, err)
        response = StageReply(
            status="failed", error=f"{type(err).__name__}: site data or files unusable (details in the site's log)"
        )
    except (ConfigError, StageError, ArtifactError, SigningKeyError, ValueError) as err:
        logger.error("stage %d failed: %s", stage_index, err)
        response = StageReply(status="failed", error=f"{type(err).__name__}: {err}")
    seconds = time.perf_counter() - started
    finished = True
    events.emit(
        "stage_finished",
        stage=stage_index,
        outcome=response.status,
        seconds=seconds,
        reused=response.reused,
        error=response.error,
        artifact_sha256=response.artifact_sha256,
    )
    extra.update(privacy_fields(response.files))  # the audit's figures and decision beside what left
    return _send(cfg, events, build_stage_reply(msg, response), status=response.status, **extra)


def _step(msg: Message, context: Context, step: str) -> Message:
    """Run one consortium step and reply with its signed receipt (or the refusal / failure)."""
    _configure_logging()
    cfg = _site_config(context)
    events = SiteEvents(cfg.work_dir / EVENTS_FILE)
    events.emit("message_in", bytes=request_bytes(msg), message_id=message_id(msg), step=step)
    start_supervisor_watch(lambda supervisor: os._exit(ABANDONED_EXIT_CODE))  # see `stage`: the only watch
    extra: dict[str, object] = {"step": step}
    try:
        request = parse_step_request(msg)
        if request.step != step:
            raise ProtocolError(f"a {step!r} message carries a {request.step!r} request")
        extra.update(run_id=request.run_id, stage=request.stage_index, round=request.round)
        logger.info("stage %d: %s step (round %d) received", request.stage_index, step, request.round)
        reply = run_site_step(cfg, request, load_private_key(cfg.private_key), events)
    except (RefusedError, ProtocolError) as err:
        logger.error("%s step refused: %s", step, err)
        reply = StepReply(status="refused", error=str(err))
    except (SiteDataError, OSError) as err:  # may name local files: details stay in the site log
        logger.error("%s step failed on site data: %s", step, err)
        reply = StepReply(
            status="failed", error=f"{type(err).__name__}: site data or files unusable (details in the site's log)"
        )
    except (ConfigError, StageError, ArtifactError, SigningKeyError, ValueError) as err:
        logger.error("%s step failed: %s", step, err)
        reply = StepReply(status="failed", error=f"{type(err).__name__}: {err}")
    events.emit("step_finished", step=step, outcome=reply.status, error=reply.error)
    return _send(cfg, events, build_step_reply(msg, reply, step), status=reply.status, **extra)


@app.train("round")
def fedavg_round(msg: Message, context: Context) -> Message:
    """Train one FedAvg round of a consortium stage from the coordinator's weights."""
    return _step(msg, context, "round")


@app.query("stats")
def sufficient_stats(msg: Message, context: Context) -> Message:
    """Count, sum and sum of squares of the final model's block inputs on this site's images."""
    return _step(msg, context, "stats")


@app.train("invert")
def invert(msg: Message, context: Context) -> Message:
    """Invert the stage's final model into candidate images (the inversion site)."""
    return _step(msg, context, "invert")


@app.query("gate")
def gate(msg: Message, context: Context) -> Message:
    """Pass or block each candidate against this site's real images (verdicts only)."""
    return _step(msg, context, "gate")


@app.train("finalize")
def finalize(msg: Message, context: Context) -> Message:
    """Sign the stage's artifact with the candidates every site passed (the inversion site)."""
    return _step(msg, context, "finalize")
