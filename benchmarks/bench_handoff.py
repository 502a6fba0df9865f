"""Hand-off cost: the same artifact bytes through our Flower hand-off and through a plain TLS socket, and size.

    python benchmarks/bench_handoff.py [--profile tiny] [--pad-mb 10,50] [--repeats 3] [--out bench-out/handoff]

Transport: a SuperLink (TLS + node authentication) and one SuperNode on 127.0.0.1; a ServerApp pushes each
payload with the production codec (`server.codec`) and waits for the ClientApp's sha256 ack. The baseline sends
the same bytes over a Python `ssl` socket (CA-verified, one connection per transfer) and waits for the same ack.
Payloads: a real stage artifact (trained and inverted on the CT sample images) and random padding artifacts
(random, because Flower deduplicates identical 5 MiB chunks).

Size: the artifact's bytes (weights, statistics, synthetic pool) against the 5 % real buffer it replaces —
as model inputs (what the `real_buffer` baseline ships, float16) and as the raw image files of 5 % of the data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import tomli_w

from invcoss.localfed import free_port
from invcoss_core.artifact import read_artifact_files, write_artifact_dir
from invcoss_core.common.signing import generate_private_key, private_key_openssh, public_key_openssh
from invcoss_core.config import build_config
from server.pki import CertificatePaths, create_certificates

BIN = Path(sys.executable).parent


def make_artifact(profile: str, out: Path) -> tuple[Path, dict[str, Any]]:
    """Train one CT stage with inversion on the sample images; returns the artifact folder and the data sizes."""
    from invcoss_core.data import fetch_samples, load_site_dataset
    from invcoss_core.training import run_stage

    samples = fetch_samples(progress=False)
    config = build_config(
        profile,
        {
            "replay": {"strategy": "inversion"},
            "train": {"epochs": 1},
            "inversion": {"iterations": 5, "iterations_per_batch": 3},
        },
    )
    spec = config.model.spec("ct")
    data = load_site_dataset(samples / "ct", "ct", spec, config.data, split="train", seed=0)
    run_stage(config=config, modality="ct", train_data=data, run_id="bench", site="A", out_dir=out / "artifact")
    raw = sum(p.stat().st_size for p in (samples / "ct").rglob("*") if p.is_file())
    buffer_samples = max(1, round(config.replay.buffer_fraction * len(data)))
    return out / "artifact", {
        "train_samples": len(data),
        "input_shape": list(spec.input_shape),
        "buffer_samples": buffer_samples,
        "real_buffer_bytes_float16": buffer_samples * math.prod(spec.input_shape) * 2,
        "raw_data_bytes": raw,
        "raw_buffer_bytes": int(raw * config.replay.buffer_fraction),
    }


def pad_artifact(out: Path, megabytes: int) -> Path:
    """A payload folder of `megabytes` random bytes (plus a manifest, so it reads like an artifact folder)."""
    folder = out / f"pad-{megabytes}mb"
    write_artifact_dir({"manifest.json": b"{}", "pad.safetensors": os.urandom(megabytes << 20)}, folder)
    return folder


def tls_transfer(paths: CertificatePaths, payload: bytes, repeats: int) -> list[float]:
    """Seconds per transfer of `payload` over a fresh CA-verified TLS connection, until a sha256 ack."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(paths.server_cert), str(paths.server_key))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(repeats):
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                size = struct.unpack("!Q", _read(tls, 8))[0]
                digest = hashlib.sha256()
                remaining = size
                while remaining:
                    chunk = tls.recv(min(1 << 20, remaining))
                    digest.update(chunk)
                    remaining -= len(chunk)
                tls.sendall(digest.digest())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(paths.ca_cert))
    expected = hashlib.sha256(payload).digest()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(struct.pack("!Q", len(payload)) + payload)
            if _read(tls, 32) != expected:
                raise RuntimeError("TLS baseline: digest mismatch")
        times.append(time.perf_counter() - started)
    thread.join(timeout=30)
    listener.close()
    return times


def _read(sock: ssl.SSLSocket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed early")
        data += chunk
    return data


def flower_transfer(work: Path, paths: CertificatePaths, payloads: list[dict[str, Any]], repeats: int) -> list[dict]:
    """Time each payload through SuperLink → SuperNode (TLS, node auth) with the production codec."""
    env = dict(
        os.environ,
        FLWR_HOME=str(work / "flwr-home"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    port = free_port()
    (work / "flwr-home").mkdir(parents=True, exist_ok=True)
    (work / "flwr-home" / "config.toml").write_text(
        tomli_w.dumps(
            {
                "superlink": {
                    "default": "bench",
                    "bench": {"address": f"127.0.0.1:{port}", "root-certificates": str(paths.ca_cert)},
                }
            }
        )
    )
    key = generate_private_key()
    (work / "site.key").write_bytes(private_key_openssh(key))
    os.chmod(work / "site.key", 0o600)
    (work / "site.pub").write_bytes(public_key_openssh(key))
    app = work / "app"
    app.mkdir()
    shutil.copy(Path(__file__).with_name("handoff_app.py"), app / "handoff_app.py")
    (app / "pyproject.toml").write_text(
        tomli_w.dumps(
            {
                "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
                "project": {"name": "bench-handoff", "version": "1.0.0", "dependencies": []},
                "tool": {
                    "flwr": {
                        "app": {
                            "publisher": "invcoss",
                            "components": {"serverapp": "handoff_app:app", "clientapp": "handoff_app:client"},
                            "config": {"plan-file": "", "results-file": ""},
                        }
                    }
                },
            }
        )
    )
    plan, results = work / "plan.json", work / "results.json"
    plan.write_text(json.dumps({"payloads": payloads, "repeats": repeats}))
    procs: list[subprocess.Popen[bytes]] = []
    log = open(work / "flower.log", "wb")  # noqa: SIM115 - closed in finally
    try:
        procs.append(
            subprocess.Popen(
                [
                    str(BIN / "flower-superlink"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--ssl-ca-certfile",
                    str(paths.ca_cert),
                    "--ssl-certfile",
                    str(paths.server_cert),
                    "--ssl-keyfile",
                    str(paths.server_key),
                    "--enable-supernode-auth",
                    "--database",
                    str(work / "link.db"),
                    "--disable-runtime-dependency-installation",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        )
        _wait_healthy(port, paths)
        subprocess.run(
            [str(BIN / "flwr"), "supernode", "register", str(work / "site.pub"), "bench", "--name", "bench"],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        procs.append(
            subprocess.Popen(
                [
                    str(BIN / "flower-supernode"),
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--root-certificates",
                    str(paths.ca_cert),
                    "--auth-supernode-private-key",
                    str(work / "site.key"),
                    "--port",
                    str(free_port()),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        )
        time.sleep(3)
        subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                str(app),
                "bench",
                "--run-config",
                f'plan-file="{plan}"',
                "--run-config",
                f'results-file="{results}"',
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        deadline = time.monotonic() + 1800
        while not results.exists() and time.monotonic() < deadline:
            time.sleep(1)
        if not results.exists():
            raise RuntimeError(f"the Flower hand-off did not finish; see {work / 'flower.log'}")
        return list(json.loads(results.read_text()))
    finally:
        for proc in reversed(procs):
            try:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, 9)
        log.close()


def _wait_healthy(port: int, paths: CertificatePaths) -> None:
    import urllib.request

    context = ssl.create_default_context(cafile=str(paths.ca_cert))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=context, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("SuperLink did not start")


def main() -> None:
    """Run the benchmark and print/write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="tiny", help="model profile of the real artifact (tiny, small)")
    parser.add_argument("--pad-mb", default="10,50", help="sizes of random padding payloads in MiB ('' for none)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-out/handoff"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-handoff-"))
    try:
        paths = create_certificates(work / "certs")
        artifact, sizes = make_artifact(args.profile, work)
        folders = [("artifact", artifact)] + [
            (f"random {mb} MiB", pad_artifact(work, mb)) for mb in (int(x) for x in args.pad_mb.split(",") if x)
        ]
        payloads: list[dict[str, Any]] = [
            {"name": name, "dir": str(folder), "bytes": sum(len(b) for b in read_artifact_files(folder).values())}
            for name, folder in folders
        ]
        flower = flower_transfer(work, paths, payloads, args.repeats)
        rows = []
        for item in payloads:
            data = read_artifact_files(Path(item["dir"]))
            blob = b"".join(data[n] for n in sorted(data))
            tls = tls_transfer(paths, blob, args.repeats)
            fl = [r["seconds"] for r in flower if r["name"] == item["name"]]
            assert all(r["intact"] for r in flower if r["name"] == item["name"])
            rows.append(
                {
                    "payload": item["name"],
                    "bytes": item["bytes"],
                    "flower_s": statistics.median(fl),
                    "tls_s": statistics.median(tls),
                    "ratio": statistics.median(fl) / statistics.median(tls),
                    "flower_all_s": fl,
                    "tls_all_s": tls,
                }
            )
        files = read_artifact_files(artifact)
        artifact_bytes = sum(len(b) for b in files.values())
        size = {
            **sizes,
            "artifact_bytes": artifact_bytes,
            "artifact_files": {n: len(b) for n, b in files.items()},
            "synthetic_vs_real_buffer_model_inputs": len(files["synthetic.safetensors"])
            / sizes["real_buffer_bytes_float16"],
            "artifact_vs_raw_buffer": artifact_bytes / max(1, sizes["raw_buffer_bytes"]),
        }
        result = {"profile": args.profile, "transport": rows, "size": size}
        (args.out / "results.json").write_text(json.dumps(result, indent=2))
        print(f"{'payload':<18}{'bytes':>12}{'flower s':>10}{'tls s':>9}{'ratio':>8}")
        for r in rows:
            print(f"{r['payload']:<18}{r['bytes']:>12}{r['flower_s']:>10.2f}{r['tls_s']:>9.3f}{r['ratio']:>8.0f}")
        print(json.dumps(size, indent=2))
        print(f"results in {args.out / 'results.json'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
