"""Durable run state of the coordinator: atomic JSON (write, fsync, rename) plus an append-only journal.

`run.json` says which stages are done and where their verified artifacts are; a restarted coordinator reads it
and continues after the last finished stage. Every transition is also appended to `journal.jsonl`, so "each
stage recorded done exactly once" can be checked after the fact. Writers take `run.lock` (fcntl) around each
read-modify-write.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from invcoss_core.common.eventlog import append_jsonl
from server.config import FederationConfig

StageStatus = Literal["pending", "running", "done", "failed"]
RunStatus = Literal["pending", "running", "done", "failed"]


class StateError(RuntimeError):
    """The durable state is missing, corrupt or belongs to another plan; the message says what to do."""


@dataclass(frozen=True)
class StateLayout:
    """File layout of a coordinator state folder."""

    root: Path

    @property
    def run_file(self) -> Path:
        return self.root / "run.json"

    @property
    def lock_file(self) -> Path:
        return self.root / "run.lock"

    @property
    def journal(self) -> Path:
        return self.root / "journal.jsonl"

    @property
    def plan_file(self) -> Path:
        """The validated federation config, as JSON, for the ServerApp process."""
        return self.root / "plan.json"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def enrolled(self) -> Path:
        return self.root / "enrolled"

    @property
    def registered(self) -> Path:
        return self.root / "registered.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def database(self) -> Path:
        return self.root / "linkstate.db"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def app_dir(self) -> Path:
        return self.root / "app"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def report(self) -> Path:
        return self.root / "report.json"

    @property
    def pid_file(self) -> Path:
        return self.root / "coordinator.pid"

    def checkpoint(self, index: int) -> Path:
        """Artifact folder of stage `index`."""
        return self.checkpoints / f"stage-{index:02d}"

    def consortium(self, index: int) -> Path:
        """Folder of a consortium stage's round weights, pooled statistics, candidates and verdicts."""
        return self.root / "consortium" / f"stage-{index:02d}"

    def enrolled_key(self, site: str) -> Path:
        """OpenSSH public key file of an enrolled site."""
        return self.enrolled / f"{site}.pub"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SiteRound(_Model):
    """One site's answer in one FedAvg round (numbers only)."""

    num_examples: int  # FedAvg weight: the site's training samples
    loss: float
    replay_loss: float | None = None
    seconds: float = 0.0
    bytes_in: int = 0  # weights received from the site


class RoundRecord(_Model):
    """A finished FedAvg round of a consortium stage."""

    round: int = Field(ge=1)
    weights_sha256: str  # the aggregated model after this round (consortium/stage-k/round-<r>.safetensors)
    sites: dict[str, SiteRound]  # the sites whose updates were averaged
    missing: dict[str, str] = Field(default_factory=dict)  # site -> why it did not count in this round
    seconds: float = 0.0
    bytes_out: int = 0  # weights (and parent artifacts) sent to the sites
    finished_at: str = ""


class StageRecord(_Model):
    """What the coordinator knows about one stage."""

    index: int = Field(ge=1)
    site: str  # the site that signs the stage's artifact (a consortium stage's inversion site)
    modality: str | None = None
    status: StageStatus = "pending"
    attempts: int = 0
    artifact_sha256: str | None = None
    checkpoint: str | None = None  # folder relative to the state dir
    seconds: float | None = None  # send → verified, successful attempt
    started_at: str | None = None
    finished_at: str | None = None
    bytes_out: int = 0  # artifact bytes sent to the site (successful attempt)
    bytes_in: int = 0  # artifact bytes received from the site
    synthetic_count: int | None = None  # synthetic images in the artifact (all modalities so far)
    privacy_gate: dict[str, Any] | None = None
    privacy: dict[str, Any] | None = None  # the signed manifest's privacy audit (figures and decision)
    metrics: dict[str, float] = Field(default_factory=dict)
    epoch_losses: list[float] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)  # one line per failed attempt
    # Consortium stages (DESIGN §7); empty for one-site stages.
    sites: list[str] = Field(default_factory=list)
    phase: str | None = None  # rounds, stats, invert, gate, finalize
    rounds: list[RoundRecord] = Field(default_factory=list)
    delivered: list[str] = Field(default_factory=list)  # sites that confirmed holding the parent artifact
    stats_tokens: dict[str, int] = Field(default_factory=dict)  # site -> tokens in its sufficient statistics
    gate_verdicts: dict[str, dict[str, int]] = Field(default_factory=dict)  # site -> {checked, blocked}


class RunState(_Model):
    """run.json: the durable state of one federated run."""

    version: Literal[1] = 1
    run_id: str
    plan_sha256: str
    status: RunStatus = "pending"
    created_at: str
    updated_at: str
    stages: list[StageRecord]
    flower_run_ids: list[int] = Field(default_factory=list)
    error: str | None = None
    final_model: str | None = None  # folder relative to the state dir

    def next_stage(self) -> StageRecord | None:
        """The first stage that is not done, or None when the plan is complete."""
        return next((s for s in self.stages if s.status != "done"), None)

    def stage(self, index: int) -> StageRecord:
        """The record of stage `index` (1-based)."""
        return self.stages[index - 1]


def now_iso() -> str:
    """Current UTC time, ISO 8601 with seconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def locked(layout: StateLayout) -> Iterator[None]:
    """Hold the state folder's exclusive lock."""
    layout.root.mkdir(parents=True, exist_ok=True)
    with open(layout.lock_file, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def load_state(layout: StateLayout) -> RunState | None:
    """The run state, or None when no run was started in this folder.

    Raises:
        StateError: when run.json exists but is unreadable.
    """
    if not layout.run_file.is_file():
        return None
    try:
        return RunState.model_validate(json.loads(layout.run_file.read_bytes()))
    except (OSError, ValueError, ValidationError) as err:
        raise StateError(
            f"{layout.run_file} is unreadable ({err}); restore it from a backup or move the state folder away "
            "to start a new run"
        ) from None


def save_state(layout: StateLayout, state: RunState) -> RunState:
    """Persist `state` atomically (stamping updated_at) and return what was written."""
    stamped = state.model_copy(update={"updated_at": now_iso()})
    atomic_write(layout.run_file, stamped.model_dump_json(indent=2).encode())
    return stamped


def journal(layout: StateLayout, event: str, **fields: Any) -> None:
    """Append a state transition to journal.jsonl."""
    append_jsonl(layout.journal, {"time": now_iso(), "event": event, **fields})


def read_journal(layout: StateLayout) -> list[dict[str, Any]]:
    """Every journal entry, oldest first (a torn last line is skipped)."""
    if not layout.journal.is_file():
        return []
    entries = []
    for line in layout.journal.read_text().splitlines():
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    return entries


def new_state(config: FederationConfig) -> RunState:
    """A fresh state for `config`'s plan with a new run id."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    created = now_iso()
    return RunState(
        run_id=f"{config.run_name}-{stamp}-{secrets.token_hex(3)}",
        plan_sha256=config.plan_sha256(),
        created_at=created,
        updated_at=created,
        stages=[
            StageRecord(index=i, site=s.signer, modality=s.modality, sites=s.site_names if s.is_consortium else [])
            for i, s in enumerate(config.stages, 1)
        ],
    )


def init_state(layout: StateLayout, config: FederationConfig, new_run: bool = False) -> RunState:
    """Load the run of this state folder, or start one; refuse a plan that differs from the stored run's.

    Args:
        new_run: archive the existing run.json (as run-<run_id>.json) and start a new run.
    Raises:
        StateError: when the stored run has a different plan and `new_run` is False.
    """
    with locked(layout):
        state = load_state(layout)
        if state is not None and new_run:
            layout.run_file.rename(layout.root / f"run-{state.run_id}.json")
            state = None
        if state is None:
            state = save_state(layout, new_state(config))
            journal(layout, "run_created", run_id=state.run_id, plan_sha256=state.plan_sha256)
            return state
        if state.plan_sha256 != config.plan_sha256():
            raise StateError(
                f"the state folder {layout.root} holds run {state.run_id} of another plan (stages or settings "
                "changed); restore the original federation.toml to continue it, or pass --new-run to start over"
            )
        return state


def update_state(layout: StateLayout, change: Callable[[RunState], RunState]) -> RunState:
    """Read, change and write the run state under the lock.

    Raises:
        StateError: when there is no run state.
    """
    with locked(layout):
        state = load_state(layout)
        if state is None:
            raise StateError(f"no run state in {layout.root}; start the coordinator first")
        return save_state(layout, change(state))


def replace_stage(state: RunState, record: StageRecord) -> RunState:
    """A copy of `state` with stage `record.index` replaced."""
    stages = list(state.stages)
    stages[record.index - 1] = record
    return state.model_copy(update={"stages": stages})
