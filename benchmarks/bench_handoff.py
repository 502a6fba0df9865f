"""Hand-off cost: the same artifact bytes through our Flower hand-off and through a plain TLS socket, and size.

    python benchmarks/bench_handoff.py [--profile tiny] [--pad-mb 10,50] [--repeats 3] [--out bench-out/handoff]

Transport: a SuperLink (TLS + node authentication) and one SuperNode on 127.0.0.1; a ServerApp pushes each
payload with the production codec (`server.codec`) and waits for the ClientApp's sha256 ack. The baseline sends
the same bytes over a Python `ssl` socket (CA-verified, one connection per transfer) and waits for the same ack.
Payloads: a real stage artifact (trained and inverted on the CT sample images) and random padding artifacts
(random, because Flower deduplicates identical 5 MiB chunks).

Size: the artifact's bytes (weights, statistics, synthetic pool) against the 5 % real buffer it replaces —
as model inputs (what the `real_buffer` baseline ships, float16) and as the raw image files of 5 % of the data.

`--base`: instead of the trained artifact, a `base`-sized one built without training — the ViT-B encoder and
decoder weights (seeded initialisation), statistics recorded on two random samples per modality, and full synthetic
pools of CT, MRI and pathology at `base` input sizes (`--pool` images each, random values; default 5 % of the
`base` preset's 2048 samples) — as after a third stage, and the tiny trained artifact for the fixed per-stage
overhead (the same path with a small payload). For each `--part-mib` size, a fresh SuperLink + SuperNode: the
ServerApp verifies the payload as the coordinator verifies a parent and sends it with the coordinator's
`FlowerGrid.send_stage` (0: one message; otherwise files above the size ahead as `train.part` messages); the
ClientApp stores the parts and decodes the stage message with the site's code. It reports the bytes per part of
the artifact (and what float16 weights would take), the time against the goal (≤ 1.5 × the TLS socket's + the
fixed overhead) and the peak resident memory (VmHWM, sampled every 0.1 s) of every Flower process against the
artifact's bytes: the SuperLink, the ServerApp (the coordinator's side), the SuperNode and the ClientApps (the
site's). Results: docs/results/real-sizes/handoff.md.

    python benchmarks/bench_handoff.py --base --repeats 1 --part-mib 0,128,256 --out bench-out/base
    cp bench-out/base/results.json docs/results/real-sizes/handoff.json
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


def make_base_artifact(out: Path, pool: int) -> tuple[Path, dict[str, Any]]:
    """A `base`-sized artifact after three stages (CT, MRI, pathology), no training; returns it and its part sizes."""
    import torch
    from safetensors.torch import save as safetensors_bytes

    from invcoss_core.artifact import encode_artifact
    from invcoss_core.data import TensorImages
    from invcoss_core.stats import FeatureStatsRecorder, merge_stats
    from invcoss_core.training.stage import record_statistics, seeded_model

    torch.set_num_threads(1)
    config = build_config("base")
    modalities = ["ct", "mri", "pathology"]
    model = seeded_model(config, "handoff-bench")
    stats: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(0)
    for modality in modalities:
        shape = config.model.spec(modality).input_shape
        recorder = FeatureStatsRecorder(model, modality)
        record_statistics(
            model,
            recorder,
            TensorImages(torch.rand(2, *shape, generator=generator)),
            2,
            modality,
            torch.device("cpu"),
            0,
        )
        stats = merge_stats(stats, recorder.result())
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    pools = {m: torch.rand(pool, *config.model.spec(m).input_shape, generator=generator) for m in modalities}
    files = encode_artifact(
        run_id="bench",
        stage_index=3,
        site="A",
        modalities=modalities,
        profile="base",
        replay="inversion",
        parent_sha256=None,
        architecture=config.model,
        weights=weights,
        stats=stats,
        synthetic=pools,
    )
    write_artifact_dir(files, out / "base-artifact")
    parts = {name: len(data) for name, data in files.items()}
    return out / "base-artifact", {
        "pool_images_per_modality": pool,
        "parts_bytes": parts,
        "weights_float16_bytes": len(
            safetensors_bytes({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()})
        ),
        "parameters": sum(v.numel() for v in weights.values()),
    }


FLOWER_ROLES = {
    "flower-superlink": "superlink",
    "flwr-serverapp": "serverapp",
    "flower-supernode": "supernode",
    "flwr-clientapp": "clientapp",
}


class ProcessPeaks:
    """Peak resident memory (VmHWM) per Flower process role, over the process trees started here.

    A process counts when one of its ancestors is a root registered in `roots` (Flower starts the ServerApp and
    ClientApp processes through `flower-superexec`, some in sessions of their own, so sessions are not enough).
    """

    def __init__(self) -> None:
        self.roots: set[int] = set()
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return dict(self.peaks)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            parents: dict[int, int] = {}
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    except (OSError, ValueError, IndexError):
                        continue  # the process ended meanwhile
            for pid in parents:
                if self._descends(pid, parents):
                    self._sample(Path("/proc") / str(pid))

    def _descends(self, pid: int, parents: dict[int, int]) -> bool:
        for _ in range(64):  # bounded walk up the tree
            if pid in self.roots:
                return True
            if pid not in parents or pid <= 1:
                return False
            pid = parents[pid]
        return False

    def _sample(self, entry: Path) -> None:
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = (entry / "status").read_text()
        except OSError:
            return  # the process ended meanwhile
        role = next((r for name, r in FLOWER_ROLES.items() if name in command), None)
        hwm = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")), 0)
        if role is not None:
            self.peaks[role] = max(self.peaks.get(role, 0), hwm)


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


def flower_transfer(
    work: Path,
    paths: CertificatePaths,
    payloads: list[dict[str, Any]],
    repeats: int,
    peaks: ProcessPeaks | None = None,
    part_mib: int = 0,
    verify_parent: bool = False,
) -> list[dict]:
    """Time each payload through SuperLink → SuperNode (TLS, node auth) with the production codec.

    `peaks`, when given, watches the memory of the Flower processes started here (their process trees).
    `part_mib` > 0 sends files above that size ahead as `train.part` messages, as the coordinator does.
    `verify_parent` has the ServerApp verify each payload first, as the coordinator verifies a parent: tensors
    copied out without parts (the coordinator before parts), views of the files with parts (after).
    """
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
    plan.write_text(
        json.dumps({"payloads": payloads, "repeats": repeats, "part_mib": part_mib, "verify_parent": verify_parent})
    )
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
        if peaks is not None:
            peaks.roots.add(procs[-1].pid)
            peaks.start()
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
        if peaks is not None:
            peaks.roots.add(procs[-1].pid)
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


def _payloads(folders: list[tuple[str, Path]]) -> list[dict[str, Any]]:
    return [
        {"name": name, "dir": str(folder), "bytes": sum(len(b) for b in read_artifact_files(folder).values())}
        for name, folder in folders
    ]


def _rows(
    paths: CertificatePaths, payloads: list[dict[str, Any]], flower: list[dict], repeats: int
) -> list[dict[str, Any]]:
    """Flower's times beside the TLS socket's for the same bytes, per payload."""
    rows = []
    for item in payloads:
        data = read_artifact_files(Path(item["dir"]))
        blob = b"".join(data[n] for n in sorted(data))
        del data
        tls = tls_transfer(paths, blob, repeats)
        del blob
        mine = [r for r in flower if r["name"] == item["name"]]
        fl = [r["seconds"] for r in mine]
        rows.append(
            {
                "payload": item["name"],
                "bytes": item["bytes"],
                "intact": all(r.get("intact", False) for r in mine),  # the site's sha256 matched what was sent
                "errors": [r["error"] for r in mine if "error" in r],
                "parts": mine[0].get("parts", 0),
                "flower_s": statistics.median(fl),
                "tls_s": statistics.median(tls),
                "ratio": statistics.median(fl) / statistics.median(tls),
                "flower_all_s": fl,
                "tls_all_s": tls,
            }
        )
    return rows


def run_base(work: Path, paths: CertificatePaths, args: argparse.Namespace) -> dict[str, Any]:
    """The `--base` comparison: per part size, one fresh federation with its own memory watch."""
    artifact, base = make_base_artifact(work, args.pool)
    tiny, _ = make_artifact("tiny", work)  # the fixed per-stage overhead: the same path with a small payload
    payloads = _payloads([("base artifact", artifact), ("tiny artifact", tiny)])
    artifact_bytes = payloads[0]["bytes"]
    runs = []
    for part_mib in (int(x) for x in args.part_mib.split(",") if x):
        peaks = ProcessPeaks()
        flower = flower_transfer(work / f"flower-{part_mib}", paths, payloads, args.repeats, peaks, part_mib, True)
        memory = peaks.stop()
        rows = _rows(paths, payloads, flower, args.repeats)
        big, small = rows
        overhead = small["flower_s"]
        runs.append(
            {
                "part_mib": part_mib,
                "transport": rows,
                "fixed_overhead_s": overhead,
                "goal_s": 1.5 * big["tls_s"] + overhead,
                "handoff_vs_goal": big["flower_s"] / (1.5 * big["tls_s"] + overhead),
                "peak_rss_bytes": memory,
                "peak_rss_vs_artifact": {role: b / artifact_bytes for role, b in sorted(memory.items())},
            }
        )
        print(json.dumps(runs[-1], indent=2), flush=True)
    return {"profile": "base", "artifact_bytes": artifact_bytes, "base": base, "runs": runs}


def main() -> None:
    """Run the benchmark and print/write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="tiny", help="model profile of the real artifact (tiny, small)")
    parser.add_argument("--pad-mb", default="10,50", help="sizes of random padding payloads in MiB ('' for none)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-out/handoff"))
    parser.add_argument("--base", action="store_true", help="a base-sized artifact (no training) and peak memory")
    parser.add_argument("--pool", type=int, default=102, help="--base: synthetic images per modality")
    parser.add_argument(
        "--part-mib",
        default="0,128,256",
        help="--base: part sizes to compare, MiB (0: the whole artifact in one message)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-handoff-"))
    try:
        paths = create_certificates(work / "certs")
        if args.base:
            result = run_base(work, paths, args)
            (args.out / "results.json").write_text(json.dumps(result, indent=2))
            print(json.dumps(result, indent=2))
            return
        artifact, sizes = make_artifact(args.profile, work)
        folders = [("artifact", artifact)]
        folders += [
            (f"random {mb} MiB", pad_artifact(work, mb)) for mb in (int(x) for x in args.pad_mb.split(",") if x)
        ]
        payloads = _payloads(folders)
        flower = flower_transfer(work / "flower", paths, payloads, args.repeats)
        rows = _rows(paths, payloads, flower, args.repeats)
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
