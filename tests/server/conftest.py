"""Fixtures for coordinator unit tests: a state folder with enrolled keys, signed artifacts, a fake Flower grid."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from invcoss_core.artifact import encode_artifact
from invcoss_core.common.protocol import StageReply, StageRequest
from invcoss_core.common.signing import PrivateKey, generate_private_key, public_key_openssh, sign_bytes
from invcoss_core.config import build_config
from invcoss_core.models import build_model
from server.codec import NodeView, Received
from server.config import FederationConfig, parse_federation_config
from server.handoff import enroll_key
from server.state import StateLayout, init_state
from tests.helpers import task_identity

SITES = ("A", "B", "C")
MODALITIES = {"A": "ct", "B": "mri", "C": "pathology"}


def federation_config(tmp_path: Path, stages: int = 2, **sections: Any) -> FederationConfig:
    data: dict[str, Any] = {
        "state_dir": "state",
        "defaults": {"replay": {"strategy": "none"}},
        "retry": {"backoff_s": 1.0, "stage_timeout_s": 30.0, "node_wait_s": 10.0, "max_attempts": 3},
        "stages": [{"site": s, "modality": MODALITIES[s]} for s in SITES[:stages]],
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_federation_config(data, "test.toml", tmp_path)


@dataclass
class Keys:
    private: dict[str, PrivateKey]

    def signer(self, site: str) -> Callable[[bytes], bytes]:
        return lambda data: sign_bytes(self.private[site], data)


@pytest.fixture
def keys() -> Keys:
    return Keys({site: generate_private_key() for site in (*SITES, "evil")})


@pytest.fixture
def enrolled(tmp_path: Path, keys: Keys) -> StateLayout:
    layout = StateLayout(tmp_path / "state")
    for site in SITES:
        enroll_key(layout, site, public_key_openssh(keys.private[site]), f"{site}.pub")
    return layout


def make_artifact(
    keys: Keys,
    *,
    run_id: str,
    stage: int,
    site: str,
    parent: str | None,
    signer_site: str | None = None,
    modalities: list[str] | None = None,
) -> dict[str, bytes]:
    """A real, signed artifact of the tiny model (no training)."""
    config = build_config("tiny")
    torch.manual_seed(stage)
    weights = build_model(config.model).state_dict()
    mods = modalities or [MODALITIES[s] for s in SITES[:stage]]
    return encode_artifact(
        run_id=run_id,
        stage_index=stage,
        site=site,
        modalities=mods,
        profile="tiny",
        replay="none",
        parent_sha256=parent,
        architecture=config.model,
        weights=weights,
        stats={},
        synthetic={},
        signer=keys.signer(signer_site or site),
    )


@dataclass
class FakeClock:
    t: float = 0.0
    sleeps: list[float] = field(default_factory=list)

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds


Responder = Callable[[StageRequest, Mapping[str, bytes], int], StageReply | str | None]


@dataclass
class FakeGrid:
    """Sites answer through `responder(request, parent_files, attempt)`: a reply, an error string, or None (silence)."""

    responder: Responder
    clock: FakeClock
    keys: Keys | None = None  # the keys the SuperNodes authenticate with (None: every node uses no key)
    online: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(SITES, True))
    activations: dict[str, str] = field(default_factory=lambda: dict.fromkeys(SITES, "t0"))
    sent: list[StageRequest] = field(default_factory=list)
    parents: list[dict[str, bytes]] = field(default_factory=list)
    pending: dict[str, Received] = field(default_factory=dict)
    on_nodes: Callable[[FakeGrid], None] | None = None

    def nodes(self) -> list[NodeView]:
        if self.on_nodes is not None:
            self.on_nodes(self)
        return [NodeView(i + 1, s, self.online[s], self.activations[s], self._pem(s)) for i, s in enumerate(SITES)]

    def _pem(self, site: str) -> bytes:
        if self.keys is None:
            return b""
        from cryptography.hazmat.primitives import serialization

        return (
            self.keys.private[site]
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )

    def send_stage(self, node_id: int, request: StageRequest, parent_files: Mapping[str, bytes], ttl: float) -> str:
        self.sent.append(request)
        self.parents.append(dict(parent_files))
        message_id = f"m{len(self.sent)}"
        answer = self.responder(request, parent_files, request.attempt)
        if isinstance(answer, StageReply):
            self.pending[message_id] = Received(message_id, answer, None)
        elif isinstance(answer, str):
            self.pending[message_id] = Received(message_id, None, answer)
        return message_id

    def receive(self, message_ids: Any) -> list[Received]:
        ready = [self.pending.pop(m) for m in list(message_ids) if m in self.pending]
        return ready


def ok_reply(files: dict[str, bytes]) -> StageReply:
    from invcoss_core.artifact import decode_artifact

    return StageReply("ok", "", files, decode_artifact(files).sha256, epoch_losses=[1.0, 0.5])


@pytest.fixture
def config(tmp_path: Path) -> FederationConfig:
    return federation_config(tmp_path)


@pytest.fixture
def layout(enrolled: StateLayout, config: FederationConfig) -> StateLayout:
    init_state(enrolled, config)
    return enrolled


@pytest.fixture(autouse=True)
def flower_task_identity() -> Iterator[None]:
    """Flower builds Messages only inside a task; give unit tests the identity an app process would have."""
    with task_identity():
        yield
