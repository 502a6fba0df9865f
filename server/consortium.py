"""The coordinator's side of a consortium stage: FedAvg rounds, pooled statistics, inversion, all-site gate.

DESIGN §7. A `[[stages]]` entry with `sites = [...]` runs here instead of the one-site hand-off of `server.plan`:

1. `rounds` FedAvg rounds: every online site of the stage gets the round's global weights (and, until it has
   confirmed holding it, the parent artifact) and returns its trained weights + sample count under a signed
   receipt; Flower's FedAvg (`server.codec.fedavg`) averages the verified updates once `min_sites` answered.
2. `stats`: every site returns count / sum / sum of squares of the final model's block inputs; pooled exactly.
3. `invert` (inverting replay strategies): the inversion site synthesises candidates and its own verdicts.
4. `gate`: every other site of the stage returns one verdict per candidate; all of them must answer.
5. `finalize`: the inversion site signs the stage's artifact with the candidates every site passed; it is
   verified like any stage artifact and becomes the stage's checkpoint.

Every phase's result is persisted (`StateLayout.consortium`, run.json) before the next starts, so a restarted
coordinator resumes at the first unfinished round or phase. A failed phase is retried with the plan's backoff;
a site that drops out of a round is left out of that round only and rejoins at the next.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from invcoss_core.artifact import Artifact, ArtifactError, sha256_hex
from invcoss_core.common.protocol import (
    CANDIDATES_FILE,
    STATS_FILE,
    WEIGHTS_FILE,
    ProtocolError,
    Receipt,
    StageReply,
    StepReply,
    StepRequest,
    payload_bytes,
    payload_digest,
)
from invcoss_core.common.signing import verify_bytes
from invcoss_core.config import StageConfig
from invcoss_core.consortium import INVERTING_STRATEGIES, initial_weights, round_config
from invcoss_core.inversion.synthesize import images_needed
from invcoss_core.stats import SufficientStats
from server.codec import NodeView, describe_nodes, fedavg
from server.config import StagePlan
from server.handoff import EnrollmentError, enrolled_key, node_key_matches, verify_stage_artifact
from server.state import (
    RoundRecord,
    RunState,
    SiteRound,
    StageRecord,
    atomic_write,
    journal,
    load_state,
    now_iso,
    replace_stage,
    update_state,
)

if TYPE_CHECKING:
    from server.plan import Parent, PlanRunner

logger = logging.getLogger(__name__)

__all__ = ["ConsortiumStage"]


class _PhaseFailedError(RuntimeError):
    """One attempt of a round or phase did not get the answers it needs."""


@dataclass(frozen=True)
class _Answer:
    """A verified step reply of one site."""

    reply: StepReply
    receipt: Receipt


def _load(data: bytes, what: str) -> dict[str, torch.Tensor]:
    try:
        return dict(st_load(data))
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise _PhaseFailedError(f"{what} is not a valid safetensors file: {err}") from None


class ConsortiumStage:
    """Runs one consortium stage for a PlanRunner (whose state, transport, clock and events it uses)."""

    def __init__(self, runner: PlanRunner, state: RunState, record: StageRecord, parent: Parent) -> None:
        self.runner = runner
        self.run_id = state.run_id
        self.index = record.index
        self.plan: StagePlan = runner.config.stages[record.index - 1]
        self.base: StageConfig = runner.config.stage_config(record.index)
        self.config = round_config(self.base, self.plan.rounds, self.plan.local_steps, self.plan.local_epochs)
        self.parent = parent
        self.folder = runner.layout.consortium(record.index)
        self.modality = self.plan.modality or ""
        self.started = runner.clock.now()
        self.bytes_out = 0

    # -- state ------------------------------------------------------------------------------------------------
    @property
    def record(self) -> StageRecord:
        state = load_state(self.runner.layout)
        if state is None:
            raise _PhaseFailedError(f"the run state in {self.runner.layout.root} is gone")
        return state.stage(self.index)

    def _update(self, **changes: Any) -> StageRecord:
        def change(state: RunState) -> RunState:
            return replace_stage(state, state.stage(self.index).model_copy(update=changes))

        return update_state(self.runner.layout, change).stage(self.index)

    def _round_file(self, r: int) -> Path:
        return self.folder / f"round-{r:03d}.safetensors"

    def _weights_bytes(self, r: int) -> bytes:
        return self._round_file(r).read_bytes()

    # -- the stage --------------------------------------------------------------------------------------------
    def run(self) -> bool:
        """Run every unfinished round and phase; True when the stage's artifact was verified and persisted."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self._round_file(0).is_file():
            weights = initial_weights(self.config, self.parent.artifact)
            atomic_write(self._round_file(0), st_save(weights, metadata={"format": "pt"}))
        record = self._update(status="running", started_at=self.record.started_at or now_iso())
        for r in range(len(record.rounds) + 1, self.plan.rounds + 1):
            if not self._retried(f"round {r}", functools.partial(self._round, r)):
                return False
        phases: list[tuple[str, Callable[[int], None]]] = [("stats", self._stats)]
        if self.base.replay.strategy in INVERTING_STRATEGIES:
            phases.append(("invert", self._invert))
            if len(self.plan.site_names) > 1:
                phases.append(("gate", self._gate))
        done = self._done_phases()
        for name, phase in phases:
            if name not in done and not self._retried(name, phase):
                return False
        return self._retried("finalize", self._finalize)

    def _done_phases(self) -> set[str]:
        done = set()
        if (self.folder / STATS_FILE).is_file():
            done.add("stats")
        verdicts = self._verdicts()
        if (self.folder / CANDIDATES_FILE).is_file() and self.plan.signer in verdicts:
            done.add("invert")
        if set(self.plan.site_names) <= set(verdicts):
            done.add("gate")
        return done

    def _retried(self, what: str, attempt_fn: Callable[[int], None]) -> bool:
        retry = self.runner.config.retry
        self._update(phase=what.split()[0])
        for attempt in range(1, retry.max_attempts + 1):
            try:
                attempt_fn(attempt)
                return True
            except _PhaseFailedError as err:
                self.runner._record_failure(self.index, f"{what}, attempt {attempt}: {err}")
                logger.warning("stage %d %s attempt %d failed: %s", self.index, what, attempt, err)
                if attempt < retry.max_attempts:
                    wait = retry.backoff(attempt)
                    self.runner._emit("stage_retry", stage=self.index, step=what, attempt=attempt + 1, wait_s=wait)
                    self.runner.clock.sleep(wait)
        return False

    # -- talking to several sites -----------------------------------------------------------------------------
    def _request(self, step: str, site: str, attempt: int, payload: Mapping[str, bytes], **extra: Any) -> StepRequest:
        m = self.parent.artifact.manifest if self.parent.artifact else None
        needs_parent = self.parent.artifact is not None and site not in self.record.delivered
        return StepRequest(
            step=step,
            run_id=self.run_id,
            stage_index=self.index,
            site=site,
            modality=self.plan.modality,
            profile=self.runner.config.profile,
            settings=self.runner.config.stage_overrides(self.index),
            attempt=attempt,
            rounds=self.plan.rounds,
            local_steps=self.plan.local_steps,
            local_epochs=self.plan.local_epochs,
            parent_sha256=self.parent.artifact.sha256 if self.parent.artifact else None,
            parent_site=m.site if m else None,
            parent_parent_sha256=m.parent_sha256 if m else None,
            parent_public_key=self.parent.public_key,
            files=dict(self.parent.files) if needs_parent else {},
            payload=dict(payload),
            **extra,
        )

    def _online(self, sites: list[str], required: int) -> dict[str, NodeView]:
        """The online, correctly keyed SuperNodes of `sites`: all of them if they come within
        `retry.all_sites_wait_s`, else at least `required` within `retry.node_wait_s`."""
        retry = self.runner.config.retry
        clock = self.runner.clock
        start = clock.now()
        announced = False
        while True:
            nodes = self.runner.transport.nodes()
            online: dict[str, NodeView] = {}
            for site in sites:
                match = [n for n in nodes if n.name == site and n.online]
                if not match:
                    continue
                if self.runner.config.superlink.node_auth:
                    try:
                        key = enrolled_key(self.runner.layout, site)
                    except EnrollmentError as err:
                        raise _PhaseFailedError(str(err)) from None
                    if not node_key_matches(match[0].public_key, key):
                        raise _PhaseFailedError(f"the SuperNode named {site!r} does not use the enrolled key")
                online[site] = match[0]
            waited = clock.now() - start
            if len(online) == len(sites) or (len(online) >= required and waited >= retry.all_sites_wait_s):
                return online
            if not announced:
                missing = [s for s in sites if s not in online]
                logger.info("waiting for sites %s (nodes: %s)", ", ".join(missing), describe_nodes(nodes))
                for site in missing:
                    self.runner._emit("site_waiting", site=site, stage=self.index)
                announced = True
            if waited >= retry.node_wait_s:
                raise _PhaseFailedError(
                    f"only {len(online)} of the {required} sites needed came online within {retry.node_wait_s:.0f} s "
                    f"(missing: {', '.join(s for s in sites if s not in online)})"
                )
            clock.sleep(retry.poll_interval_s)

    def _exchange(
        self, step: str, sites: list[str], required: int, make: Callable[[str], StepRequest]
    ) -> tuple[dict[str, _Answer], dict[str, str]]:
        """Send one step to `sites`, collect verified answers until each site answered or dropped out.

        Returns:
            (site -> verified answer, site -> why it did not count).
        Raises:
            _PhaseFailedError: when fewer than `required` sites answered.
        """
        retry = self.runner.config.retry
        clock = self.runner.clock
        nodes = self._online(sites, required)
        outstanding: dict[str, tuple[str, StepRequest, NodeView]] = {}
        failures: dict[str, str] = {s: "offline when the step was sent" for s in sites if s not in nodes}
        for site, node in nodes.items():
            request = make(site)
            try:
                message_id = self.runner.transport.send_step(node.node_id, request, retry.ttl_s)
            except ProtocolError as err:
                failures[site] = str(err)
                continue
            outstanding[message_id] = (site, request, node)
            sent = payload_bytes(request.payload) + payload_bytes(request.files)
            self.bytes_out += sent
            self.runner._emit(
                "step_sent",
                stage=self.index,
                step=step,
                round=request.round,
                site=site,
                bytes=sent,
                message_id=message_id,
            )
        answers: dict[str, _Answer] = {}
        deadline = clock.now() + retry.stage_timeout_s
        while outstanding:
            for received in self.runner.transport.receive(list(outstanding)):
                entry = outstanding.pop(received.reply_to, None)
                if entry is None:
                    continue
                site, request, _ = entry
                try:
                    answers[site] = self._verify(site, request, received.step, received.error)
                except _PhaseFailedError as err:
                    failures[site] = str(err)
                    self.runner._emit("step_refused", stage=self.index, step=step, site=site, error=str(err))
            current = {n.node_id: n for n in self.runner.transport.nodes()}
            for message_id, (site, _, node) in list(outstanding.items()):
                now = current.get(node.node_id)
                if now is None or not now.online or now.last_activated_at != node.last_activated_at:
                    failures[site] = "went offline or restarted during the step"
                    del outstanding[message_id]
            if not outstanding:
                break
            if clock.now() >= deadline:
                for site, _, _ in outstanding.values():
                    failures[site] = f"no reply within {retry.stage_timeout_s:.0f} s"
                break
            clock.sleep(retry.poll_interval_s)
        if len(answers) < required:
            why = "; ".join(f"{s}: {e}" for s, e in sorted(failures.items()))
            raise _PhaseFailedError(f"{step}: {len(answers)} of the {required} sites needed answered ({why})")
        return answers, {s: e for s, e in failures.items() if s not in answers}

    def _verify(self, site: str, request: StepRequest, reply: StepReply | None, error: str | None) -> _Answer:
        """A site's reply, accepted only with a receipt signed by its enrolled key for exactly this request."""
        if reply is None:
            raise _PhaseFailedError(error or "empty reply")
        if not reply.ok:
            raise _PhaseFailedError(f"site {site} {reply.status}: {reply.error}")
        try:
            receipt = Receipt.from_bytes(reply.receipt)
            key = enrolled_key(self.runner.layout, site)
        except (ProtocolError, EnrollmentError) as err:
            raise _PhaseFailedError(f"site {site}: {err}") from None
        if not verify_bytes(key, reply.receipt, reply.signature):
            raise _PhaseFailedError(f"site {site}: the receipt's signature does not verify with its enrolled key")
        expected = (self.run_id, self.index, request.step, request.round, site, payload_digest(request.payload))
        got = (receipt.run_id, receipt.stage_index, receipt.step, receipt.round, receipt.site, receipt.base_sha256)
        if got != expected:
            raise _PhaseFailedError(f"site {site}: the receipt is for another request (replayed or misdirected)")
        if receipt.files != {name: sha256_hex(data) for name, data in sorted(reply.payload.items())}:
            raise _PhaseFailedError(f"site {site}: the payload does not match its signed receipt")
        if site not in self.record.delivered:
            self._update(delivered=sorted({*self.record.delivered, site}))
        return _Answer(reply, receipt)

    # -- rounds -----------------------------------------------------------------------------------------------
    def _round(self, r: int, attempt: int) -> None:
        started = self.runner.clock.now()
        before = self.bytes_out
        global_bytes = self._weights_bytes(r - 1)
        reference = _load(global_bytes, f"round {r - 1} weights")
        answers, missing = self._exchange(
            "round",
            self.plan.site_names,
            self.plan.required_sites,
            lambda site: self._request("round", site, attempt, {WEIGHTS_FILE: global_bytes}, round=r),
        )
        contributions = []
        sites: dict[str, SiteRound] = {}
        for site, answer in sorted(answers.items()):
            weights = _load(answer.reply.payload.get(WEIGHTS_FILE, b""), f"site {site}'s round {r} weights")
            if set(weights) != set(reference) or any(weights[k].shape != reference[k].shape for k in reference):
                raise _PhaseFailedError(f"site {site} returned weights of another architecture")
            if not all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point()):
                raise _PhaseFailedError(f"site {site} returned non-finite weights")
            n = answer.receipt.num_examples
            if n <= 0:
                raise _PhaseFailedError(f"site {site} reported {n} training samples")
            contributions.append((weights, float(n)))
            m = answer.receipt.metrics
            if not math.isfinite(m.get("loss", math.nan)):
                raise _PhaseFailedError(f"site {site}'s receipt has no finite round loss")
            sites[site] = SiteRound(
                num_examples=n,
                loss=float(m["loss"]),
                replay_loss=m.get("replay_loss"),
                seconds=float(m.get("seconds", 0.0)),
                bytes_in=payload_bytes(answer.reply.payload),
            )
        averaged = fedavg(contributions)
        data = st_save(averaged, metadata={"format": "pt"})
        atomic_write(self._round_file(r), data)

        entry = RoundRecord(
            round=r,
            weights_sha256=sha256_hex(data),
            sites=sites,
            missing=missing,
            seconds=round(self.runner.clock.now() - started, 3),
            bytes_out=self.bytes_out - before,
            finished_at=now_iso(),
        )
        record = self.record
        self._update(rounds=[*record.rounds, entry])
        journal(self.runner.layout, "round_done", stage=self.index, round=r, sites=sorted(sites))
        self.runner._emit(
            "round_done",
            stage=self.index,
            round=r,
            rounds=self.plan.rounds,
            sites={s: {"num_examples": v.num_examples, "loss": v.loss} for s, v in sites.items()},
            missing=sorted(missing),
            seconds=entry.seconds,
        )
        logger.info(
            "stage %d round %d/%d: averaged %d site(s) (%s)%s",
            self.index,
            r,
            self.plan.rounds,
            len(sites),
            ", ".join(f"{s} n={v.num_examples} loss={v.loss:.4f}" for s, v in sites.items()),
            f"; missing {', '.join(sorted(missing))}" if missing else "",
        )

    # -- after the rounds -------------------------------------------------------------------------------------
    def _final_weights(self) -> bytes:
        return self._weights_bytes(self.plan.rounds)

    def _stats(self, attempt: int) -> None:
        weights = self._final_weights()
        answers, _ = self._exchange(
            "stats",
            self.plan.site_names,
            self.plan.required_sites,
            lambda site: self._request("stats", site, attempt, {WEIGHTS_FILE: weights}),
        )
        model = self.config.model
        parts = []
        for site, answer in sorted(answers.items()):
            tensors = _load(answer.reply.payload.get(STATS_FILE, b""), f"site {site}'s statistics")
            try:
                parts.append(SufficientStats.from_tensors(tensors, self.modality, model.num_layers, model.hidden_size))
            except ValueError as err:
                raise _PhaseFailedError(f"site {site}'s statistics refused: {err}") from None
        pooled = parts[0]
        for part in parts[1:]:
            pooled = pooled + part
        atomic_write(self.folder / STATS_FILE, st_save(pooled.to_tensors()))
        examples = {site: a.receipt.num_examples for site, a in answers.items()}
        atomic_write(self.folder / "examples.json", json.dumps(examples).encode())
        self._update(stats_tokens={s: p.count for s, p in zip(sorted(answers), parts)})
        journal(self.runner.layout, "stats_pooled", stage=self.index, sites=sorted(answers), tokens=pooled.count)
        self.runner._emit("stats_pooled", stage=self.index, sites=sorted(answers), tokens=pooled.count)

    def _verdicts(self) -> dict[str, list[bool]]:
        path = self.folder / "verdicts.json"
        return dict(json.loads(path.read_text())) if path.is_file() else {}

    def _save_verdicts(self, verdicts: Mapping[str, list[bool]]) -> None:
        atomic_write(self.folder / "verdicts.json", json.dumps(dict(verdicts), sort_keys=True).encode())
        summary = {site: {"checked": len(v), "blocked": sum(not x for x in v)} for site, v in verdicts.items()}
        self._update(gate_verdicts=summary)

    def _invert(self, attempt: int) -> None:
        examples = json.loads((self.folder / "examples.json").read_text())
        num_images = images_needed(self.base.inversion, sum(int(n) for n in examples.values()))
        payload = {WEIGHTS_FILE: self._final_weights(), STATS_FILE: (self.folder / STATS_FILE).read_bytes()}
        signer = self.plan.signer
        answers, _ = self._exchange(
            "invert",
            [signer],
            1,
            lambda site: self._request("invert", site, attempt, payload, num_images=num_images),
        )
        answer = answers[signer]
        data = answer.reply.payload.get(CANDIDATES_FILE, b"")
        pool = _load(data, "the candidates").get(self.modality)
        spec = self.config.model.spec(self.modality)
        if pool is None or pool.dtype != torch.float16 or tuple(pool.shape[1:]) != spec.input_shape:
            raise _PhaseFailedError(f"site {signer} returned candidates that are not a {self.modality} pool")
        if len(answer.receipt.verdicts) != pool.shape[0]:
            raise _PhaseFailedError(
                f"site {signer} returned {len(answer.receipt.verdicts)} verdicts for {pool.shape[0]}"
            )
        atomic_write(self.folder / CANDIDATES_FILE, data)
        self._save_verdicts({signer: answer.receipt.verdicts})
        self.runner._emit(
            "candidates",
            stage=self.index,
            site=signer,
            images=int(pool.shape[0]),
            blocked=sum(not v for v in answer.receipt.verdicts),
        )

    def _gate(self, attempt: int) -> None:
        verdicts = self._verdicts()
        others = [s for s in self.plan.site_names if s not in verdicts]
        candidates = (self.folder / CANDIDATES_FILE).read_bytes()
        count = len(verdicts[self.plan.signer])
        payload = {WEIGHTS_FILE: self._final_weights(), CANDIDATES_FILE: candidates}
        # Every site whose images are in the model must pass an image before it leaves: no quorum here.
        answers, _ = self._exchange(
            "gate", others, len(others), lambda site: self._request("gate", site, attempt, payload)
        )
        for site, answer in answers.items():
            if len(answer.receipt.verdicts) != count:
                raise _PhaseFailedError(f"site {site} returned {len(answer.receipt.verdicts)} verdicts for {count}")
            verdicts[site] = answer.receipt.verdicts
            self.runner._emit(
                "gate_verdicts",
                stage=self.index,
                site=site,
                checked=count,
                blocked=sum(not v for v in answer.receipt.verdicts),
            )
        self._save_verdicts(verdicts)

    def _finalize(self, attempt: int) -> None:
        signer = self.plan.signer
        payload = {WEIGHTS_FILE: self._final_weights(), STATS_FILE: (self.folder / STATS_FILE).read_bytes()}
        verdicts = self._verdicts() or {signer: []}
        if (self.folder / CANDIDATES_FILE).is_file():
            payload[CANDIDATES_FILE] = (self.folder / CANDIDATES_FILE).read_bytes()
        answers, _ = self._exchange(
            "finalize",
            [signer],
            1,
            lambda site: self._request("finalize", site, attempt, payload, verdicts=verdicts),
        )
        reply = answers[signer].reply
        try:
            artifact: Artifact = verify_stage_artifact(
                reply.files,
                public_key=enrolled_key(self.runner.layout, signer),
                run_id=self.run_id,
                stage_index=self.index,
                parent_sha256=self.parent.artifact.sha256 if self.parent.artifact else None,
                site=signer,
                modality=self.plan.modality,
            )
        except (ArtifactError, EnrollmentError) as err:
            self.runner._emit("artifact_refused", stage=self.index, site=signer, error=str(err))
            raise _PhaseFailedError(f"artifact refused: {err}") from None
        if artifact.weights.keys() != _load(payload[WEIGHTS_FILE], "final weights").keys():
            raise _PhaseFailedError("the signed artifact does not hold the stage's aggregated model")
        self.runner._emit("artifact_verified", stage=self.index, site=signer, sha256=artifact.sha256)
        rounds = self.record.rounds
        losses = [
            sum(s.loss * s.num_examples for s in r.sites.values()) / sum(s.num_examples for s in r.sites.values())
            for r in rounds
        ]
        stage_reply = StageReply(
            status="ok",
            files=reply.files,
            artifact_sha256=artifact.sha256,
            metrics={
                "rounds": float(len(rounds)),
                "consortium_sites": float(len(self.plan.site_names)),
                "train_seconds": sum(max(s.seconds for s in r.sites.values()) for r in rounds),
            },
            epoch_losses=losses,
        )
        self.runner._persist(self.record, stage_reply, artifact, self.bytes_out, self.runner.clock.now() - self.started)
