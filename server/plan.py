"""The stage-plan loop of the ServerApp, independent of Flower: send, wait, verify, persist, retry, finish.

`run_plan` walks the stages that are not done in durable state. For each it sends the previous stage's verified
artifact to the stage's site, waits for the reply (watching the site's liveness), verifies the returned artifact,
persists it as the stage checkpoint and records the stage as done — exactly once. A failed, refused or timed-out
attempt is retried with exponential backoff up to `retry.max_attempts`; then the run stops as failed with the
reasons in run.json and report.json. A coordinator restarted mid-plan calls `run_plan` again and continues at the
first stage that is not done.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from invcoss_core.artifact import Artifact, ArtifactError, file_sizes, write_artifact_dir
from invcoss_core.common.eventlog import emit_event
from invcoss_core.common.protocol import ProtocolError, StageReply, StageRequest, StepRequest, payload_bytes
from invcoss_core.common.signing import public_key_openssh
from server.codec import NodeView, Received, describe_nodes
from server.config import FederationConfig
from server.handoff import (
    EnrollmentError,
    enrolled_key,
    load_checkpoint_artifact,
    node_key_matches,
    publish_final_model,
    verify_stage_artifact,
)
from server.state import (
    RunState,
    StageRecord,
    StateLayout,
    atomic_write,
    journal,
    now_iso,
    replace_stage,
    update_state,
)

logger = logging.getLogger(__name__)


class Transport(Protocol):
    """What the plan loop needs from Flower (see `server.codec.FlowerGrid`)."""

    def nodes(self) -> list[NodeView]: ...

    def send_stage(self, node_id: int, request: StageRequest, parent_files: Mapping[str, bytes], ttl: float) -> str: ...

    def send_step(self, node_id: int, request: StepRequest, ttl: float) -> str: ...

    def receive(self, message_ids: Collection[str]) -> list[Received]: ...


class AttemptFailedError(RuntimeError):
    """One attempt of a stage did not produce an accepted artifact; the message says why."""


@dataclass(frozen=True)
class Clock:
    """Time source and sleep (replaced in unit tests)."""

    now: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


@dataclass(frozen=True)
class Parent:
    """The artifact a stage starts from."""

    artifact: Artifact | None
    files: Mapping[str, bytes]  # in memory, or an `ArtifactFiles` read from disk when sent (one-site stages)
    public_key: str | None  # producing site's enrolled OpenSSH key


class PlanRunner:
    """Runs the stages of one federation plan against a Transport, persisting every step."""

    def __init__(
        self, config: FederationConfig, layout: StateLayout, transport: Transport, clock: Clock | None = None
    ) -> None:
        self.config = config
        self.layout = layout
        self.transport = transport
        self.clock = clock or Clock()

    # -- events and state -------------------------------------------------------------------------------------
    def _emit(self, kind: str, **fields: Any) -> None:
        emit_event(self.layout.events, kind, **fields)

    def _update_stage(self, index: int, **changes: Any) -> RunState:
        def change(state: RunState) -> RunState:
            record = state.stage(index).model_copy(update=changes)
            return replace_stage(state, record)

        return update_state(self.layout, change)

    def _set_run(self, **changes: Any) -> RunState:
        return update_state(self.layout, lambda s: s.model_copy(update=changes))

    # -- the plan ---------------------------------------------------------------------------------------------
    def run(self) -> RunState:
        """Run every stage that is not done; returns the final state (status done or failed)."""
        state = self._set_run(status="running", error=None)
        self._emit(
            "run_started",
            run_id=state.run_id,
            stages=len(state.stages),
            done=sum(s.status == "done" for s in state.stages),
        )
        while (record := state.next_stage()) is not None:
            if not self._run_stage(state, record):
                return self._fail_run(record)
            state = self._set_run()
        return self._finish_run(state)

    def _parent(self, state: RunState, index: int) -> Parent:
        if index == 1:
            return Parent(None, {}, None)
        prev = state.stage(index - 1)
        # A one-site stage only forwards the parent's files; a consortium stage averages from its weights.
        keep = self.config.stages[index - 1].is_consortium
        artifact, files = load_checkpoint_artifact(self.layout, index - 1, prev.site, prev.artifact_sha256, keep)
        key = public_key_openssh(enrolled_key(self.layout, prev.site)).decode()
        return Parent(artifact, files, key)

    def _request(self, state: RunState, record: StageRecord, parent: Parent, attempt: int) -> StageRequest:
        m = parent.artifact.manifest if parent.artifact else None
        return StageRequest(
            run_id=state.run_id,
            stage_index=record.index,
            site=record.site,
            modality=record.modality,
            profile=self.config.profile,
            settings=self.config.stage_overrides(record.index),
            attempt=attempt,
            parent_sha256=parent.artifact.sha256 if parent.artifact else None,
            parent_site=m.site if m else None,
            parent_parent_sha256=m.parent_sha256 if m else None,
            parent_public_key=parent.public_key,
        )

    def _run_stage(self, state: RunState, record: StageRecord) -> bool:
        retry = self.config.retry
        try:
            parent = self._parent(state, record.index)
        except (ArtifactError, EnrollmentError) as err:
            self._record_failure(record.index, f"cannot load the parent artifact: {err}")
            return False
        if self.config.stages[record.index - 1].is_consortium:
            from server.consortium import ConsortiumStage

            return ConsortiumStage(self, state, record, parent).run()
        outstanding: dict[str, int] = {}  # message id -> attempt; a late reply to any attempt is accepted
        for attempt in range(1, retry.max_attempts + 1):
            started = self.clock.now()
            try:
                reply, bytes_out = self._attempt(state, record, parent, attempt, outstanding)
                artifact = self._accept(state, record, parent, reply)
            except AttemptFailedError as err:
                self._record_failure(record.index, f"attempt {attempt}: {err}")
                if attempt < retry.max_attempts:
                    wait = retry.backoff(attempt)
                    self._emit("stage_retry", stage=record.index, site=record.site, attempt=attempt + 1, wait_s=wait)
                    logger.warning(
                        "stage %d (site %s) attempt %d failed: %s; retrying in %.0f s",
                        record.index,
                        record.site,
                        attempt,
                        err,
                        wait,
                    )
                    self.clock.sleep(wait)
                continue
            self._persist(record, reply, artifact, bytes_out, self.clock.now() - started)
            return True
        return False

    def _attempt(
        self, state: RunState, record: StageRecord, parent: Parent, attempt: int, outstanding: dict[str, int]
    ) -> tuple[StageReply, int]:
        node = self._wait_for_site(record.site)
        request = self._request(state, record, parent, attempt)
        try:
            message_id = self.transport.send_stage(node.node_id, request, parent.files, self.config.retry.ttl_s)
        except ProtocolError as err:
            raise AttemptFailedError(str(err)) from None
        outstanding[message_id] = attempt
        bytes_out = sum(file_sizes(parent.files).values())

        def mark_running(current: RunState) -> RunState:
            stage = current.stage(record.index)
            update = {"status": "running", "attempts": stage.attempts + 1, "started_at": now_iso()}
            return replace_stage(current, stage.model_copy(update=update))

        update_state(self.layout, mark_running)
        self._emit(
            "stage_sent", stage=record.index, site=record.site, attempt=attempt, bytes=bytes_out, message_id=message_id
        )
        journal(self.layout, "stage_sent", stage=record.index, site=record.site, attempt=attempt, message_id=message_id)
        logger.info("stage %d → site %s (attempt %d, %d bytes)", record.index, record.site, attempt, bytes_out)
        return self._wait_for_reply(record, node, outstanding), bytes_out

    def _wait_for_site(self, site: str) -> NodeView:
        """The online SuperNode enrolled as `site`, waiting up to `retry.node_wait_s`."""
        deadline = self.clock.now() + self.config.retry.node_wait_s
        announced = False
        try:
            key = enrolled_key(self.layout, site) if self.config.superlink.node_auth else None
        except EnrollmentError as err:
            raise AttemptFailedError(str(err)) from None
        while True:
            nodes = self.transport.nodes()
            match = [n for n in nodes if n.name == site]
            online = [n for n in match if n.online]
            if online:
                node = online[0]
                if key is not None and not node_key_matches(node.public_key, key):
                    raise AttemptFailedError(f"the SuperNode named {site!r} does not use the enrolled key of that site")
                return node
            if not announced:
                logger.info("waiting for site %s to come online (nodes: %s)", site, describe_nodes(nodes))
                self._emit("site_waiting", site=site)
                announced = True
            if self.clock.now() >= deadline:
                raise AttemptFailedError(
                    f"site {site} did not come online within {self.config.retry.node_wait_s:.0f} s "
                    f"(is `invcoss-client --site {site}` running and enrolled?)"
                )
            self.clock.sleep(self.config.retry.poll_interval_s)

    def _wait_for_reply(self, record: StageRecord, node: NodeView, outstanding: dict[str, int]) -> StageReply:
        retry = self.config.retry
        deadline = self.clock.now() + retry.stage_timeout_s
        activated = node.last_activated_at
        while True:
            for received in self.transport.receive(outstanding):
                outstanding.pop(received.reply_to, None)
                if received.reply is None:
                    raise AttemptFailedError(received.error or "empty reply")
                if not received.reply.ok:
                    raise AttemptFailedError(f"site {record.site} {received.reply.status}: {received.reply.error}")
                return received.reply
            current = next((n for n in self.transport.nodes() if n.node_id == node.node_id), None)
            if current is not None and current.last_activated_at != activated:
                raise AttemptFailedError(f"site {record.site} restarted while running the stage")
            if self.clock.now() >= deadline:
                raise AttemptFailedError(f"no reply from site {record.site} within {retry.stage_timeout_s:.0f} s")
            self.clock.sleep(retry.poll_interval_s)

    def _accept(self, state: RunState, record: StageRecord, parent: Parent, reply: StageReply) -> Artifact:
        try:
            artifact = verify_stage_artifact(
                reply.files,
                public_key=enrolled_key(self.layout, record.site),
                run_id=state.run_id,
                stage_index=record.index,
                parent_sha256=parent.artifact.sha256 if parent.artifact else None,
                site=record.site,
                modality=record.modality,
            )
        except (ArtifactError, EnrollmentError) as err:
            self._emit("artifact_refused", stage=record.index, site=record.site, error=str(err))
            journal(self.layout, "artifact_refused", stage=record.index, site=record.site, error=str(err))
            raise AttemptFailedError(f"artifact refused: {err}") from None
        self._emit("artifact_verified", stage=record.index, site=record.site, sha256=artifact.sha256)
        return artifact

    def _persist(
        self, record: StageRecord, reply: StageReply, artifact: Artifact, bytes_out: int, seconds: float
    ) -> None:
        write_artifact_dir(reply.files, self.layout.checkpoint(record.index))
        gate = artifact.manifest.privacy_gate
        bytes_in = payload_bytes(reply.files)
        self._update_stage(
            record.index,
            status="done",
            artifact_sha256=artifact.sha256,
            checkpoint=str(self.layout.checkpoint(record.index).relative_to(self.layout.root)),
            modality=artifact.manifest.modalities[-1],
            seconds=round(seconds, 3),
            finished_at=now_iso(),
            bytes_out=bytes_out,
            bytes_in=bytes_in,
            synthetic_count=sum(artifact.manifest.synthetic.values()),
            privacy_gate=gate.model_dump(mode="json") if gate else None,
            privacy=artifact.manifest.privacy.model_dump(mode="json") if artifact.manifest.privacy else None,
            # Finite figures only: run.json is JSON, where NaN or inf would not read back as a number.
            metrics={k: v for k, v in {**artifact.manifest.metrics, **reply.metrics}.items() if math.isfinite(v)},
            epoch_losses=reply.epoch_losses,
        )
        journal(self.layout, "stage_done", stage=record.index, site=record.site, sha256=artifact.sha256)
        self._emit(
            "stage_done",
            stage=record.index,
            site=record.site,
            seconds=seconds,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            reused=reply.reused,
            resumed_from_epoch=reply.resumed_from_epoch,
        )
        logger.info(
            "stage %d (site %s) done in %.1f s: artifact %s verified and persisted",
            record.index,
            record.site,
            seconds,
            artifact.sha256[:12],
        )

    def _record_failure(self, index: int, error: str) -> None:
        def change(state: RunState) -> RunState:
            record = state.stage(index)
            return replace_stage(state, record.model_copy(update={"errors": [*record.errors, error]}))

        update_state(self.layout, change)
        self._emit("stage_failed_attempt", stage=index, error=error)
        journal(self.layout, "stage_attempt_failed", stage=index, error=error)

    def _fail_run(self, record: StageRecord) -> RunState:
        errors = update_state(self.layout, lambda s: s).stage(record.index).errors
        reason = f"stage {record.index} (site {record.site}) failed: " + (errors[-1] if errors else "unknown error")
        self._update_stage(record.index, status="failed")
        state = self._set_run(status="failed", error=reason)
        journal(self.layout, "run_failed", error=reason)
        self._emit("run_failed", error=reason)
        self._write_report(state)
        logger.error("%s", reason)
        return state

    def _finish_run(self, state: RunState) -> RunState:
        last = state.stages[-1]
        final = publish_final_model(
            self.layout,
            self.layout.checkpoint(last.index),
            {
                "run_id": state.run_id,
                "modalities": [s.modality for s in state.stages],
                "sites": [s.site for s in state.stages],  # the site that signed each stage
                "stage_sites": [s.sites or [s.site] for s in state.stages],  # every site that trained each stage
                "artifact_sha256": last.artifact_sha256,
                "profile": self.config.profile,
                "signed_by": last.site,
                "usage": "invcoss embed --model <this folder> --images DIR --modality M --out FEATS.npz",
            },
        )
        state = self._set_run(status="done", final_model=str(final.relative_to(self.layout.root)))
        journal(self.layout, "run_done", run_id=state.run_id)
        self._emit("run_done", run_id=state.run_id)
        self._write_report(state)
        logger.info("run %s finished: final model in %s", state.run_id, final)
        return state

    def _write_report(self, state: RunState) -> None:
        report = {
            "run_id": state.run_id,
            "status": state.status,
            "error": state.error,
            "final_model": state.final_model,
            "stages": [
                {
                    "index": s.index,
                    "site": s.site,
                    "modality": s.modality,
                    "status": s.status,
                    "attempts": s.attempts,
                    "seconds": s.seconds,
                    "artifact_sha256": s.artifact_sha256,
                    "bytes_out": s.bytes_out,
                    "bytes_in": s.bytes_in,
                    "errors": s.errors,
                    "sites": s.sites or [s.site],
                    "rounds": [r.model_dump(mode="json") for r in s.rounds],
                    "gate_verdicts": s.gate_verdicts,
                    "privacy": s.privacy,
                }
                for s in state.stages
            ],
        }
        atomic_write(self.layout.report, json.dumps(report, indent=2).encode())
