"""Flower app used by `bench_handoff.py`: the ServerApp sends artifact payloads, the ClientApp checks and acks them.

Copied into a throwaway app folder by the benchmark. The payloads go through the same codec as the real
hand-off (`server.codec.build_stage_message`: raw files as uint8 Arrays); the ClientApp decodes them with the
site's codec (`site_client.codec.parse_stage_request`) and replies with the sha256 of the files and nothing else,
so the measured time is one hand-off (coordinator → site) plus a tiny ack.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from invcoss_core.artifact import read_artifact_files
from server.codec import StageRequest, build_stage_message
from site_client.codec import parse_stage_request

app = ServerApp()
client = ClientApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Send each payload folder `repeats` times and record the time until the site's ack."""
    plan = json.loads(Path(str(context.run_config["plan-file"])).read_text())
    node = next(n for n in grid.get_nodes() if str(n.status) == "online")
    results = []
    for item in plan["payloads"]:
        files = read_artifact_files(Path(item["dir"]))
        digest = hashlib.sha256(b"".join(files[name] for name in sorted(files))).hexdigest()
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
            message = build_stage_message(request, files, int(node.node_id), ttl=600)
            started = time.perf_counter()
            (message_id,) = grid.push_messages([message])
            replies: list[Message] = []
            while not replies:
                replies = list(grid.pull_messages([message_id]))
                if not replies:
                    time.sleep(0.05)
            elapsed = time.perf_counter() - started
            ack = replies[0].content.config_records["ack"]
            results.append(
                {
                    "name": item["name"],
                    "bytes": item["bytes"],
                    "seconds": elapsed,
                    "intact": ack["sha256"] == digest,
                    "client_seconds": float(ack["seconds"]),
                }
            )
    Path(str(context.run_config["results-file"])).write_text(json.dumps(results, indent=2))


@client.train("stage")
def receive(msg: Message, context: Context) -> Message:
    """Decode what arrived as the site does, hash it and acknowledge it."""
    started = time.perf_counter()
    files = parse_stage_request(msg).files  # what the production site codec makes of the message
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(files[name])
    ack = ConfigRecord({"sha256": digest.hexdigest(), "seconds": time.perf_counter() - started})
    return Message(RecordDict({"ack": ack}), reply_to=msg)
