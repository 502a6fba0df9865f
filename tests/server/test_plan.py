"""The stage-plan loop against a fake grid: hand-off, verification, retries, resume, failure report."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping

from invcoss_core.artifact import decode_artifact, read_artifact_dir
from invcoss_core.common.protocol import StageReply, StageRequest
from server.config import FederationConfig
from server.plan import Clock, PlanRunner
from server.state import StateLayout, load_state, read_journal, update_state
from tests.server.conftest import FakeClock, FakeGrid, Keys, make_artifact, ok_reply


def _honest(keys: Keys):
    def respond(request: StageRequest, parent: Mapping[str, bytes], attempt: int) -> StageReply:
        return ok_reply(
            make_artifact(
                keys,
                run_id=request.run_id,
                stage=request.stage_index,
                site=request.site,
                parent=request.parent_sha256,
            )
        )

    return respond


def _runner(config: FederationConfig, layout: StateLayout, grid: FakeGrid, clock: FakeClock) -> PlanRunner:
    return PlanRunner(config, layout, grid, Clock(now=clock.now, sleep=clock.sleep))


def test_plan_hands_each_verified_artifact_to_the_next_site(config, layout, keys) -> None:
    clock = FakeClock()
    grid = FakeGrid(_honest(keys), clock, keys)
    state = _runner(config, layout, grid, clock).run()
    assert state.status == "done"
    assert [r.site for r in grid.sent] == ["A", "B"]
    assert grid.parents[0] == {}
    stage1 = read_artifact_dir(layout.checkpoint(1))
    assert grid.sent[1].parent_sha256 == stage1.sha256 == state.stages[0].artifact_sha256
    assert decode_artifact(grid.parents[1]).sha256 == stage1.sha256
    assert grid.sent[1].parent_public_key and grid.sent[1].parent_site == "A"
    assert read_artifact_dir(layout.final / "model").sha256 == state.stages[1].artifact_sha256
    assert json.loads((layout.final / "model_card.json").read_text())["sites"] == ["A", "B"]
    assert [e["stage"] for e in read_journal(layout) if e["event"] == "stage_done"] == [1, 2]
    assert state.stages[1].bytes_out == sum(len(b) for b in grid.parents[1].values())
    assert state.stages[0].epoch_losses == [1.0, 0.5]


def test_silent_site_times_out_and_is_retried_with_backoff(config, layout, keys) -> None:
    honest = _honest(keys)

    def flaky(request: StageRequest, parent: Mapping[str, bytes], attempt: int) -> StageReply | None:
        return None if (request.stage_index, attempt) == (2, 1) else honest(request, parent, attempt)

    clock = FakeClock()
    grid = FakeGrid(flaky, clock, keys)
    state = _runner(config, layout, grid, clock).run()
    assert state.status == "done"
    assert state.stages[1].attempts == 2
    assert "no reply from site B within 30 s" in state.stages[1].errors[0]
    assert config.retry.backoff_s in clock.sleeps


def test_refused_artifact_is_retried_then_the_run_stops_with_a_report(config, layout, keys) -> None:
    def forger(request: StageRequest, parent: Mapping[str, bytes], attempt: int) -> StageReply:
        files = make_artifact(
            keys,
            run_id=request.run_id,
            stage=request.stage_index,
            site=request.site,
            parent=request.parent_sha256,
            signer_site="evil",
        )
        return ok_reply(files)

    clock = FakeClock()
    grid = FakeGrid(forger, clock, keys)
    state = _runner(config, layout, grid, clock).run()
    assert state.status == "failed"
    assert len(grid.sent) == config.retry.max_attempts
    assert "signature does not verify" in (state.error or "")
    assert state.stages[0].status == "failed"
    assert not layout.checkpoint(1).exists()
    report = json.loads(layout.report.read_text())
    assert report["status"] == "failed" and len(report["stages"][0]["errors"]) == 3
    waits = [s for s in clock.sleeps if s >= 1.0]
    assert waits[:2] == [1.0, 2.0]  # exponential backoff


def test_wrong_stage_or_parent_from_a_site_is_refused(config, layout, keys) -> None:
    def replayer(request: StageRequest, parent: Mapping[str, bytes], attempt: int) -> StageReply:
        stage = 1 if request.stage_index == 2 else request.stage_index  # site B answers with an old stage
        return ok_reply(make_artifact(keys, run_id=request.run_id, stage=stage, site=request.site, parent=None))

    clock = FakeClock()
    state = _runner(config, layout, FakeGrid(replayer, clock, keys), clock).run()
    assert state.status == "failed"
    assert "replayed older artifact" in " ".join(state.stages[1].errors)


def test_site_error_reply_is_reported(config, layout, keys) -> None:
    def refusing(request: StageRequest, parent: Mapping[str, bytes], attempt: int) -> StageReply:
        return StageReply("refused", "policy says no", {}, None)

    clock = FakeClock()
    state = _runner(config, layout, FakeGrid(refusing, clock, keys), clock).run()
    assert state.status == "failed"
    assert "site A refused: policy says no" in state.stages[0].errors[0]


def test_restarted_coordinator_continues_after_the_last_finished_stage(config, layout, keys) -> None:
    clock = FakeClock()
    first = FakeGrid(_honest(keys), clock, keys)

    def crash_before_stage_2(request: StageRequest, parent: Mapping[str, bytes], attempt: int) -> StageReply:
        if request.stage_index == 2:
            raise KeyboardInterrupt  # the coordinator dies while stage 2 is in flight
        return _honest(keys)(request, parent, attempt)

    first.responder = crash_before_stage_2
    with contextlib.suppress(KeyboardInterrupt):
        _runner(config, layout, first, clock).run()
    stage1 = load_state(layout).stages[0]
    assert stage1.status == "done"
    second = FakeGrid(_honest(keys), clock, keys)
    state = _runner(config, layout, second, clock).run()
    assert state.status == "done"
    assert [r.stage_index for r in second.sent] == [2]
    assert state.stages[0].artifact_sha256 == stage1.artifact_sha256
    assert [e["stage"] for e in read_journal(layout) if e["event"] == "stage_done"] == [1, 2]


def test_a_site_restart_mid_stage_fails_the_attempt_at_once(config, layout, keys) -> None:
    honest = _honest(keys)

    def slow_then_ok(request: StageRequest, parent: Mapping[str, bytes], attempt: int) -> StageReply | None:
        return None if (request.stage_index, attempt) == (1, 1) else honest(request, parent, attempt)

    clock = FakeClock()
    grid = FakeGrid(slow_then_ok, clock, keys)

    def restart_site_a(g: FakeGrid) -> None:
        if g.sent and clock.t > 2:
            g.activations["A"] = "t1"

    grid.on_nodes = restart_site_a
    state = _runner(config, layout, grid, clock).run()
    assert state.status == "done"
    assert "site A restarted while running the stage" in state.stages[0].errors[0]
    assert clock.t < config.retry.stage_timeout_s


def test_stage_waits_for_its_site_and_gives_up_with_a_clear_error(config, layout, keys) -> None:
    clock = FakeClock()
    grid = FakeGrid(_honest(keys), clock, keys)
    grid.online["A"] = False
    state = _runner(config, layout, grid, clock).run()
    assert state.status == "failed"
    assert "site A did not come online within 10 s" in state.stages[0].errors[0]
    assert "invcoss-client --site A" in state.stages[0].errors[0]


def test_tampered_checkpoint_on_disk_is_not_forwarded(config, layout, keys) -> None:
    clock = FakeClock()
    grid = FakeGrid(_honest(keys), clock, keys)
    runner = _runner(config, layout, grid, clock)
    state = runner.run()
    update_state(
        layout,
        lambda s: s.model_copy(
            update={
                "status": "running",
                "stages": [s.stages[0], s.stages[1].model_copy(update={"status": "pending"})],
            }
        ),
    )
    weights = layout.checkpoint(1) / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    state = _runner(config, layout, grid, clock).run()
    assert state.status == "failed"
    assert "cannot load the parent artifact" in state.stages[1].errors[-1]


def test_a_node_named_like_a_site_but_with_another_key_gets_nothing(config, layout, keys) -> None:
    clock = FakeClock()
    grid = FakeGrid(_honest(keys), clock, keys)
    grid.keys = Keys({**keys.private, "A": keys.private["evil"]})
    state = _runner(config, layout, grid, clock).run()
    assert state.status == "failed" and grid.sent == []
    assert "does not use the enrolled key" in state.stages[0].errors[0]
