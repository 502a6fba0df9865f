"""Consortium steps on a site: signed receipts, round reuse, refusal of bad weights, foreign candidates, verdicts."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from invcoss_core.artifact import decode_artifact
from invcoss_core.common.protocol import (
    CANDIDATES_FILE,
    STATS_FILE,
    WEIGHTS_FILE,
    Receipt,
    StepRequest,
    payload_digest,
)
from invcoss_core.common.signing import PrivateKey, verify_bytes
from invcoss_core.config import build_config
from invcoss_core.consortium import initial_weights
from site_client.config import SiteConfig
from site_client.consortium import run_site_step
from site_client.metrics import SiteEvents
from site_client.runner import RefusedError

FAST = {
    "replay": {"strategy": "inversion"},
    "train": {"epochs": 2},
    "data": {"samples_per_volume": 4},
    "inversion": {"iterations": 2, "iterations_per_batch": 2},
}


def _weights() -> bytes:
    return st_save(initial_weights(build_config("tiny", FAST), None), metadata={"format": "pt"})


def _request(step: str, **changes: object) -> StepRequest:
    base = StepRequest(
        step=step,
        run_id="run-1",
        stage_index=1,
        site="A",
        modality="pathology",
        profile="tiny",
        settings=FAST,
        attempt=1,
        round=1 if step == "round" else 0,
        rounds=2,
        local_steps=2,
        payload={WEIGHTS_FILE: _weights()},
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def _events(cfg: SiteConfig) -> SiteEvents:
    return SiteEvents(cfg.work_dir / "events.jsonl")


def test_a_round_reply_is_signed_for_exactly_its_request_and_reused_when_asked_again(
    site_config: SiteConfig, site_key: PrivateKey
) -> None:
    request = _request("round")
    reply = run_site_step(site_config, request, site_key, _events(site_config))
    assert reply.ok and set(reply.payload) == {WEIGHTS_FILE}
    assert verify_bytes(site_key.public_key(), reply.receipt, reply.signature)
    receipt = Receipt.from_bytes(reply.receipt)
    assert (receipt.step, receipt.round, receipt.site) == ("round", 1, "A")
    assert receipt.base_sha256 == payload_digest(request.payload) and receipt.num_examples > 0
    trained = st_load(reply.payload[WEIGHTS_FILE])
    start = st_load(request.payload[WEIGHTS_FILE])
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # it trained
    again = run_site_step(site_config, replace(request, attempt=2), site_key, _events(site_config))
    assert again.payload == reply.payload
    starts = [e for e in _events(site_config).path.read_text().splitlines() if '"round_started"' in e]
    assert len(starts) == 1  # the second request re-sent the stored reply


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"payload": {}}, "carries no weights.safetensors"),
        ({"payload": {WEIGHTS_FILE: b"not safetensors"}}, "not a valid safetensors file"),
        ({"round": 3}, "outside 1..2"),
        ({"site": "B"}, "addressed to site 'B'"),
        ({"modality": "ct"}, "holds 'pathology'"),
        ({"stage_index": 2}, "parent"),
    ],
)
def test_bad_round_requests_are_refused(
    site_config: SiteConfig, site_key: PrivateKey, change: dict[str, object], message: str
) -> None:
    with pytest.raises(RefusedError, match=message):
        run_site_step(site_config, _request("round", **change), site_key, _events(site_config))


def test_non_finite_weights_are_refused(site_config: SiteConfig, site_key: PrivateKey) -> None:
    weights = st_load(_weights())
    key = next(iter(weights))
    weights[key] = weights[key].clone().fill_(float("nan"))
    with pytest.raises(RefusedError, match="NaN or inf"):
        run_site_step(
            site_config, _request("round", payload={WEIGHTS_FILE: st_save(weights)}), site_key, _events(site_config)
        )


def test_finalize_signs_only_its_own_candidates_and_releases_what_every_site_passed(
    site_config: SiteConfig, site_key: PrivateKey
) -> None:
    events = _events(site_config)
    stats = run_site_step(site_config, _request("stats"), site_key, events)
    assert set(stats.payload) == {STATS_FILE}
    inverted = run_site_step(
        site_config,
        _request("invert", payload={**_request("stats").payload, **stats.payload}, num_images=4),
        site_key,
        events,
    )
    receipt = Receipt.from_bytes(inverted.receipt)
    assert len(receipt.verdicts) == 4 and receipt.num_examples == 4
    payload = {WEIGHTS_FILE: _weights(), STATS_FILE: stats.payload[STATS_FILE]}
    candidates = inverted.payload[CANDIDATES_FILE]

    foreign = st_load(candidates)
    foreign["pathology"] = torch.rand_like(foreign["pathology"].float()).half()
    with pytest.raises(RefusedError, match="not the ones this site synthesised"):
        run_site_step(
            site_config,
            _request(
                "finalize", payload={**payload, CANDIDATES_FILE: st_save(foreign)}, verdicts={"A": receipt.verdicts}
            ),
            site_key,
            events,
        )
    with pytest.raises(RefusedError, match="3 verdicts for 4"):
        run_site_step(
            site_config,
            _request(
                "finalize",
                payload={**payload, CANDIDATES_FILE: candidates},
                verdicts={"A": [True] * 4, "B": [True] * 3},
            ),
            site_key,
            events,
        )
    other = [True, False, True, True]  # site B blocks the second candidate
    final = run_site_step(
        site_config,
        _request(
            "finalize", payload={**payload, CANDIDATES_FILE: candidates}, verdicts={"A": receipt.verdicts, "B": other}
        ),
        site_key,
        events,
    )
    artifact = decode_artifact(final.files, public_key=site_key.public_key(), require_signature=True)
    released = [a and b for a, b in zip(receipt.verdicts, other)]
    assert artifact.manifest.synthetic == {"pathology": sum(released)}
    assert artifact.manifest.metrics["gate_blocked_by_B"] == 1.0
    kept = st_load(candidates)["pathology"][torch.tensor(released)]
    assert torch.equal(artifact.synthetic["pathology"], kept)
