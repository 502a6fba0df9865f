"""A hostile ServerApp used by the integration tests: it sends tampered stage requests to a site.

Copied into a throwaway Flower app folder and submitted with `flwr run` against the test federation's SuperLink.
Run config: `requests-file` (JSON list of {name, site, request, files_dir}) and `results-file` (JSON written
back: {name: {status, error, flower_error}}).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from invcoss_core.artifact import read_artifact_files
from server.codec import FlowerGrid, StageRequest

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Send every request of `requests-file`, collect the replies into `results-file`."""
    requests = json.loads(Path(str(context.run_config["requests-file"])).read_text())
    transport = FlowerGrid(grid)
    nodes = {n.name: n for n in transport.nodes() if n.online}
    pending: dict[str, str] = {}
    for item in requests:
        files = read_artifact_files(Path(item["files_dir"])) if item["files_dir"] else {}
        request = StageRequest(**item["request"])
        message_id = transport.send_stage(nodes[item["site"]].node_id, request, files, ttl=600)
        pending[message_id] = item["name"]
    results: dict[str, dict[str, str | None]] = {}
    deadline = time.monotonic() + 300
    while pending and time.monotonic() < deadline:
        for received in transport.receive(list(pending)):
            name = pending.pop(received.reply_to)
            reply = received.reply
            results[name] = {
                "status": reply.status if reply else None,
                "error": reply.error if reply else None,
                "flower_error": received.error,
                "files": ",".join(sorted(reply.files)) if reply else "",
            }
        time.sleep(1)
    Path(str(context.run_config["results-file"])).write_text(json.dumps(results, indent=2))
