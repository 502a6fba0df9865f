"""The wire protocol: both halves agree, artifacts survive a Flower message byte for byte, nothing else passes."""

from __future__ import annotations

from pathlib import Path
from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

import server.codec as coordinator
import site_client.codec as site
from invcoss_core.artifact import ArtifactFiles, decode_artifact, write_artifact_dir
from site_client.parts import store_part
from tests.server.conftest import Keys, make_artifact


def test_both_halves_use_the_same_protocol_constants() -> None:
    names = (
        "PROTOCOL_VERSION",
        "FILE_STYPE",
        "STAGE_MESSAGE",
        "QUERY_MESSAGE",
        "ARTIFACT_RECORD",
        "STAGE_RECORD",
        "RESULT_RECORD",
        "METRICS_RECORD",
        "SITE_RECORD",
    )
    for name in names:
        assert getattr(coordinator, name) == getattr(site, name), name


def _request(parent: str | None = None) -> coordinator.StageRequest:
    return coordinator.StageRequest(
        run_id="run-1",
        stage_index=2,
        site="B",
        modality="mri",
        profile="tiny",
        settings={"train": {"epochs": 3}},
        attempt=2,
        parent_sha256=parent,
        parent_site="A",
        parent_parent_sha256=None,
        parent_public_key="ecdsa-sha2-nistp384 AAAA",
    )


def test_stage_request_round_trip_is_exact(keys: Keys) -> None:
    files = make_artifact(keys, run_id="run-1", stage=1, site="A", parent=None)
    sha = decode_artifact(files).sha256
    message = coordinator.build_stage_message(_request(sha), files, node_id=7, ttl=900)
    assert message.metadata.message_type == "train.stage"
    assert message.metadata.ttl == 900
    request = site.parse_stage_request(message)
    assert request.files == files
    assert (request.run_id, request.stage_index, request.site, request.modality) == ("run-1", 2, "B", "mri")
    assert request.settings == {"train": {"epochs": 3}}
    assert request.parent_sha256 == sha and request.parent_parent_sha256 is None and request.attempt == 2


def test_stage_reply_round_trip_is_exact(keys: Keys) -> None:
    files = make_artifact(keys, run_id="run-1", stage=1, site="A", parent=None)
    incoming = coordinator.build_stage_message(_request(), {}, node_id=7, ttl=60)
    incoming.metadata.__dict__["_message_id"] = "m-1"
    response = site.StageReply(
        status="ok",
        files=files,
        artifact_sha256="ab" * 32,
        resumed_from_epoch=2,
        metrics={"train_seconds": 1.5},
        epoch_losses=[0.9, 0.7],
    )
    outbound = site.build_stage_reply(incoming, response)
    assert outbound.kind == "stage_reply" and outbound.arrays == files and outbound.reply_to == "m-1"
    reply = coordinator.parse_stage_reply(outbound.message)
    assert reply.ok and reply.files == files and reply.resumed_from_epoch == 2
    assert reply.metrics == {"train_seconds": 1.5} and reply.epoch_losses == [0.9, 0.7]


def test_refusal_reply_carries_no_files() -> None:
    incoming = coordinator.build_stage_message(_request(), {}, node_id=7, ttl=60)
    outbound = site.build_stage_reply(incoming, site.StageReply(status="refused", error="bad signature"))
    reply = coordinator.parse_stage_reply(outbound.message)
    assert (reply.status, reply.error, reply.files) == ("refused", "bad signature", {})
    assert outbound.kind == "stage_refused" and outbound.bytes == 0


def test_arrays_that_are_not_raw_files_are_refused() -> None:
    record = ArrayRecord({"weights.safetensors": Array(np.zeros(3, dtype=np.float32))})
    content = RecordDict({"artifact": record, "stage": ConfigRecord({"protocol": 1, "stage_index": 1})})
    with pytest.raises(site.ProtocolError, match="not an artifact file"):
        site.parse_stage_request(Message(content, dst_node_id=1, message_type="train.stage"))
    with pytest.raises(coordinator.ProtocolError, match="not an artifact file"):
        coordinator.record_to_files(record)


def test_other_protocol_versions_are_refused() -> None:
    content = RecordDict({"stage": ConfigRecord({"protocol": 99, "stage_index": 1})})
    with pytest.raises(site.ProtocolError, match="protocol version 99"):
        site.parse_stage_request(Message(content, dst_node_id=1, message_type="train.stage"))


def test_fedavg_weights_each_site_by_its_samples_with_flowers_aggregation() -> None:
    import torch

    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([4.0, 8.0]), "b": torch.tensor([[3.0]])}
    out = coordinator.fedavg([(a, 1.0), (b, 2.0)])  # (1·a + 2·b) / 3
    assert torch.allclose(out["w"], torch.tensor([3.0, 6.0])) and torch.allclose(out["b"], torch.tensor([[2.0]]))
    assert out["w"].dtype == torch.float32 and out["b"].shape == (1, 1)
    with pytest.raises(ValueError, match="same parameter names"):
        coordinator.fedavg([(a, 1.0), ({"w": b["w"]}, 1.0)])
    with pytest.raises(ValueError, match="add up to zero"):
        coordinator.fedavg([(a, 0.0)])


def test_a_step_request_and_its_signed_reply_survive_flower_messages(keys: Keys) -> None:
    import dataclasses

    from invcoss_core.common.protocol import Receipt, StepReply, StepRequest
    from invcoss_core.common.signing import sign_bytes, verify_bytes

    request = StepRequest(
        step="gate",
        run_id="r",
        stage_index=2,
        site="B",
        modality="ct",
        profile="tiny",
        settings={"train": {"epochs": 1}},
        attempt=1,
        verdicts={"A": [True, False]},
        payload={"weights.safetensors": b"\x00weights", "candidates.safetensors": b"\x01pool"},
        files={"manifest.json": b"{}"},
    )
    message = coordinator.build_step_message(request, node_id=7, ttl=60.0)
    assert message.metadata.message_type == "query.gate"
    parsed = site.parse_step_request(Message(message.content, dst_node_id=7, message_type="query.gate"))
    assert parsed == request
    receipt = Receipt("r", 2, "gate", 0, "B", "0" * 64, {}, verdicts=[True, False])
    signed = receipt.to_bytes()
    reply = StepReply(status="ok", receipt=signed, signature=sign_bytes(keys.private["A"], signed))
    outbound = site.build_step_reply(message, reply, "gate")
    back = coordinator.parse_step_reply(outbound.message)
    assert dataclasses.replace(back, payload={}, files={}) == reply
    assert Receipt.from_bytes(back.receipt) == receipt and verify_bytes(
        keys.private["A"].public_key(), back.receipt, back.signature
    )
    bad = Message(
        RecordDict({"payload": ArrayRecord({"x.safetensors": Array(np.zeros(3, dtype=np.uint8))})}), reply_to=message
    )
    with pytest.raises(coordinator.ProtocolError):
        coordinator.parse_step_reply(bad)


def _send_parts(messages: list[Message], incoming: Path) -> None:
    for message in messages:
        assert message.metadata.message_type == "train.part"
        store_part(incoming, site.parse_part_request(message))


@pytest.mark.parametrize("from_disk", [False, True])
def test_a_big_artifact_travels_as_parts_ahead_of_its_stage_message_and_reassembles_exactly(
    keys: Keys, tmp_path: Path, from_disk: bool
) -> None:
    files = make_artifact(keys, run_id="run-1", stage=1, site="A", parent=None)
    sha = decode_artifact(files).sha256
    part_bytes = 4096
    source = ArtifactFiles(write_artifact_dir(files, tmp_path / "checkpoint")) if from_disk else files
    tmp_path = tmp_path / "incoming"
    *parts, message = coordinator.build_part_messages(_request(sha), source, node_id=7, ttl=900, part_bytes=part_bytes)
    assert message.metadata.message_type == "train.stage"
    assert all(p.metadata.created_at < message.metadata.created_at for p in parts)  # delivered in creation order
    big = {n: len(b) for n, b in files.items() if len(b) > part_bytes}
    assert big and len(parts) == sum(-(-size // part_bytes) for size in big.values())
    assert all(len(next(iter(p.content.array_records["artifact"].values())).data) <= part_bytes for p in parts)
    assert set(message.content.array_records["artifact"]) == set(files) - set(big)  # small files stay inline
    _send_parts(parts[::-1], tmp_path)  # the order of the slices does not matter
    request = site.parse_stage_request(message, tmp_path)
    assert request.files == files
    assert decode_artifact(request.files).sha256 == sha
    assert list(tmp_path.iterdir()) == []  # the transfer folder is gone once read


def test_a_stage_message_whose_parts_did_not_all_arrive_is_refused(keys: Keys, tmp_path: Path) -> None:
    files = make_artifact(keys, run_id="run-1", stage=1, site="A", parent=None)
    *parts, message = coordinator.build_part_messages(_request(), files, node_id=7, ttl=900, part_bytes=4096)
    _send_parts(parts[1:], tmp_path)
    with pytest.raises(site.ProtocolError, match="did not arrive whole"):
        site.parse_stage_request(message, tmp_path)
    with pytest.raises(site.ProtocolError, match="keeps none"):
        site.parse_stage_request(message)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"file": "../weights.safetensors"}, "not an artifact file"),
        ({"transfer": "../../etc"}, "32 lowercase hex"),
        ({"offset": 1 << 20}, "outside the file"),
        ({"protocol": 99}, "protocol version"),
    ],
)
def test_a_part_with_an_unsafe_name_or_a_slice_outside_its_file_is_refused(
    keys: Keys, change: dict[str, object], match: str
) -> None:
    files = make_artifact(keys, run_id="run-1", stage=1, site="A", parent=None)
    message = next(coordinator.build_part_messages(_request(), files, node_id=7, ttl=900, part_bytes=4096))
    record = message.content.config_records["part"]
    for key, value in change.items():
        record[key] = value  # type: ignore[assignment]
    with pytest.raises(site.ProtocolError, match=match):
        site.parse_part_request(message)


def test_the_grid_pushes_the_parts_before_the_stage_message_and_collects_their_acks(keys: Keys) -> None:
    files = make_artifact(keys, run_id="run-1", stage=1, site="A", parent=None)
    grid = Mock(spec=Grid)
    pushed: list[Message] = []

    def push(messages: list[Message]) -> list[str]:
        pushed.extend(messages)
        return [f"id-{len(pushed)}"]

    grid.push_messages.side_effect = push
    grid.pull_messages.return_value = []
    flower_grid = coordinator.FlowerGrid(grid, part_bytes=4096)
    message_id = flower_grid.send_stage(7, _request(), files, ttl=900)
    types = [m.metadata.message_type for m in pushed]
    assert types[-1] == "train.stage" and set(types[:-1]) == {"train.part"} and len(types) > 2
    assert message_id == f"id-{len(pushed)}"
    flower_grid.receive([message_id])
    asked = {i for call in grid.pull_messages.call_args_list for i in call.args[0]}
    assert asked == {f"id-{i}" for i in range(1, len(pushed) + 1)}
