"""Flower app used by `bench_handoff.py`: the ServerApp sends artifact payloads, the ClientApp checks and acks them.

Copied into a throwaway app folder by the benchmark. The payloads go through the same codec as the real
hand-off (`server.codec.FlowerGrid.send_stage`: raw files as uint8 Arrays, files above the part size ahead as
`train.part` slices); the ClientApp stores parts and decodes the stage message with the site's code
(`site_client.parts.store_part`, `site_client.codec.parse_stage_request`) and replies with the sha256 of the
files and nothing else, so the measured time is one hand-off (coordinator → site) plus a tiny ack.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import httpx
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from invcoss_core.artifact import ArtifactFiles, decode_artifact, file_sizes, read_artifact_files
from invcoss_core.common.protocol import plan_parts
from server.codec import FlowerGrid, StageRequest
from site_client.codec import parse_part_request, parse_stage_request
from site_client.parts import store_part

app = ServerApp()
client = ClientApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Send each payload folder `repeats` times and record the time until the site's ack.

    With `part_mib` > 0 in the plan, files above that size go ahead as `train.part` messages exactly as the
    coordinator sends them (`server.codec.FlowerGrid.send_stage`), each pushed as soon as the previous one is in the
    SuperLink; the time runs until the stage message's ack.
    """
    plan = json.loads(Path(str(context.run_config["plan-file"])).read_text())
    part_bytes = int(plan.get("part_mib", 0)) << 20 or (1 << 62)
    node = next(n for n in grid.get_nodes() if str(n.status) == "online")
    results = []
    for item in plan["payloads"]:
        files = read_artifact_files(Path(item["dir"]))
        # What the coordinator does with a parent before it sends it (`load_checkpoint_artifact`): verify it, the
        # tensors copied out (before parts) or only viewed (with parts: `keep_tensors=False`).
        if plan.get("verify_parent"):
            parent = decode_artifact(files, keep_tensors=not plan.get("part_mib", 0))
            del parent
        if plan.get("part_mib", 0):  # as `load_checkpoint_artifact(keep_tensors=False)`: sent from disk
            del files
            files = ArtifactFiles(Path(item["dir"]))
        hasher = hashlib.sha256()
        for name in sorted(files):  # incrementally: a joined copy would add the artifact's size to this process
            hasher.update(files[name])
        digest = hasher.hexdigest()
        for repeat in range(plan["repeats"]):
            request = StageRequest(
                run_id="bench",
                stage_index=2,
                site="bench",
                modality=None,
                profile="tiny",
                settings={},
                attempt=repeat + 1,
            )
            started = time.perf_counter()
            transport = FlowerGrid(grid, part_bytes=part_bytes)  # the coordinator's own send path
            message_id = transport.send_stage(int(node.node_id), request, files, ttl=600)
            replies: list[Message] = []
            deadline = time.monotonic() + 1800
            while not replies and time.monotonic() < deadline:
                try:
                    replies = list(grid.pull_messages([message_id]))
                except httpx.HTTPStatusError:  # the SuperLink's store was busy (see FlowerGrid.receive)
                    replies = []
                if not replies:
                    time.sleep(0.2)
            elapsed = time.perf_counter() - started
            transport.receive([])  # collects the parts' acknowledgements
            if not replies or replies[0].has_error():
                error = replies[0].error.reason if replies else "no reply before the deadline"
                results.append({"name": item["name"], "bytes": item["bytes"], "seconds": elapsed, "error": error})
                continue
            ack = replies[0].content.config_records["ack"]
            results.append(
                {
                    "name": item["name"],
                    "bytes": item["bytes"],
                    "seconds": elapsed,
                    "parts": len(plan_parts(file_sizes(files), part_bytes)[1]),
                    "intact": ack["sha256"] == digest,
                    "client_seconds": float(ack["seconds"]),
                }
            )
    Path(str(context.run_config["results-file"])).write_text(json.dumps(results, indent=2))


def _incoming(context: Context) -> Path:
    return Path(str(context.run_config["results-file"])).with_name("incoming")


@client.train("part")
def receive_part(msg: Message, context: Context) -> Message:
    """Store a slice as the site does (`site_client.parts.store_part`) and acknowledge it."""
    part = parse_part_request(msg)
    store_part(_incoming(context), part)
    return Message(RecordDict({"ack": ConfigRecord({"index": part.index})}), reply_to=msg)


@client.train("stage")
def receive(msg: Message, context: Context) -> Message:
    """Decode what arrived as the site does (parts included), hash it and acknowledge it."""
    started = time.perf_counter()
    files = parse_stage_request(msg, _incoming(context)).files  # what the production site codec makes of it
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(files[name])
    ack = ConfigRecord({"sha256": digest.hexdigest(), "seconds": time.perf_counter() - started})
    return Message(RecordDict({"ack": ack}), reply_to=msg)
