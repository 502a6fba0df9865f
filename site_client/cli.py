"""`invcoss-client`: run a hospital site (SuperNode + metrics), create its key pair, audit what left it."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.markup import escape

from invcoss_core.common.cli_support import console, fail, setup_logging, timestamped
from invcoss_core.common.eventlog import EventTailer
from invcoss_core.common.processes import InstanceLock, InstanceRunningError, PortUnavailableError
from invcoss_core.common.signing import generate_private_key, load_private_key, private_key_openssh, public_key_openssh
from invcoss_core.config import ConfigError, StageConfig, build_config
from invcoss_core.privacy import PrivacyReport, privacy_line
from site_client.app import EVENTS_FILE
from site_client.audit import AUDIT_FILE, AuditLog, measure_leaks, real_data_digests, stage_privacy
from site_client.config import SITE_NAME, SiteConfig, load_site_config
from site_client.metrics import SiteMetrics, serve_metrics
from site_client.supernode import SiteClientError, StageWatch, SuperNodeProcess, supervise

app = typer.Typer(
    name="invcoss-client",
    help=(
        "InvCoSS hospital site. `invcoss-client --site A --config site.toml` starts a Flower SuperNode that "
        "connects to the coordinator over TLS with the site's enrolled key and runs the stages the coordinator "
        "sends on this site's own images: verify the incoming artifact, train (resuming after an interruption), "
        "invert, privacy-gate, sign, reply. Real images never leave; every outbound message is in the audit log. "
        "First: `invcoss-client keygen --site A` and send the .pub file to the coordinator."
    ),
    pretty_exceptions_enable=False,
    add_completion=False,
)


def describe_event(event: dict[str, Any]) -> str | None:
    """One operator line for a ClientApp event worth a line (`docker compose logs`), None for step-level progress.

    Lines carry counts, losses and sizes only: never a file name or anything taken from an image.
    """
    kind = event.get("kind")
    stage = event.get("stage")
    if kind == "stage_started":
        return f"stage {stage} started (run {event.get('run_id')}, attempt {event.get('attempt')})"
    if kind == "stage_resumed":
        return f"stage {stage} resumed from its last epoch checkpoint"
    if kind == "progress":
        metrics = event.get("metrics") or {}
        if event.get("phase") == "train" and "epoch_loss" in metrics:
            return (
                f"{event.get('modality')} epoch {event.get('epoch')}/{event.get('total')}: "
                f"loss {float(metrics['epoch_loss']):.4f}"
            )
        if event.get("phase") != "train" and event.get("step") == event.get("total"):
            return f"{event.get('phase')} {event.get('modality')}: {event.get('total')} steps done"
        return None
    if kind == "gate":
        return f"privacy gate: {event.get('checked')} synthetic images checked, {event.get('blocked')} blocked"
    if kind == "message_out":
        return f"message out: {int(event.get('bytes', 0)) / 1e6:.1f} MB (in the audit log)"
    if kind == "stage_finished":
        return f"stage {stage} finished: {event.get('outcome', 'ok')} in {float(event.get('seconds', 0.0)):.0f} s"
    if kind == "stage_abandoned":
        return f"stage {stage} abandoned (its process died)"
    return None


def _load(config: Path, site: str | None) -> SiteConfig:
    try:
        return load_site_config(config, site=site)
    except ConfigError as err:
        raise fail(str(err)) from None


@app.callback(invoke_without_command=True)
def run(
    ctx: typer.Context,
    site: Annotated[str | None, typer.Option("--site", help="This site's enrolled name (as in site.toml).")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="site.toml of this site.")] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning, error.")] = "info",
) -> None:
    """Run the site until stopped (SIGTERM / Ctrl-C): SuperNode, ClientApp and /metrics."""
    if ctx.invoked_subcommand is not None:
        return
    if config is None or site is None:
        console.print(ctx.get_help())
        raise fail("--site and --config are required to run a site")
    setup_logging(log_level)
    cfg = _load(config, site)
    try:
        load_private_key(cfg.private_key)
    except Exception as err:
        raise fail(f"{err}; create the key with `invcoss-client keygen --site {site}`") from None
    if not cfg.superlink.root_certificates.is_file():
        raise fail(f"root certificate {cfg.superlink.root_certificates} not found; get ca.crt from the coordinator")
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    try:  # two supervisors of one site would fight over its SuperNode, ports and stage checkpoints
        lock = InstanceLock(cfg.work_dir / "client.lock").acquire(f"an invcoss-client of site {site}")
    except InstanceRunningError as err:
        raise fail(str(err), code=3) from None
    say = timestamped(f"[magenta]site {escape(site)}[/]")
    metrics = SiteMetrics(cfg.site)
    watch = StageWatch(since=time.time())

    def on_event(event: dict[str, Any]) -> None:
        metrics.apply(event)
        watch.apply(event)
        line = describe_event(event)
        if line is not None:
            say(line)

    if cfg.metrics.enabled:
        try:
            port = serve_metrics(metrics.registry, cfg.metrics.host, cfg.metrics.port, config)
        except PortUnavailableError as err:
            lock.release()
            raise fail(str(err), code=3) from None
        say(f"metrics on http://{cfg.metrics.host}:{port}/metrics")
    tailer = EventTailer(cfg.work_dir / EVENTS_FILE, on_event, interval_s=0.5).start()
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        say(f"received signal {signum}; stopping the SuperNode")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node = SuperNodeProcess(cfg, config)
    say(f"starting the SuperNode (coordinator {cfg.superlink.address}, data of modality {cfg.modality})")
    try:
        supervise(node, stop, say, on_restart=metrics.supernode_restarts.inc, watch=watch)
    except SiteClientError as err:
        raise fail(str(err), code=3) from None
    finally:
        node.stop()
        tailer.stop()
        lock.release()
    say("stopped")


@app.command()
def keygen(
    site: Annotated[str, typer.Option("--site", help="The site name the key is for.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for <site>.key (private) and <site>.pub.")] = Path("keys"),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key pair.")] = False,
) -> None:
    """Create the site's EC P-384 key pair: one key for node authentication and artifact signatures.

    Keep <site>.key on the site (mode 0600); give <site>.pub to the coordinator for `invcoss-server enroll`.
    """
    if not SITE_NAME.match(site):
        raise fail(f"site name {site!r} must be 1-64 letters, digits, '-' or '_'")
    private, public = out / f"{site}.key", out / f"{site}.pub"
    if private.exists() and not force:
        raise fail(f"{private} exists; pass --force to replace it (the coordinator must then re-enroll the site)")
    out.mkdir(parents=True, exist_ok=True)
    key = generate_private_key()
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_key_openssh(key))
    public.write_bytes(public_key_openssh(key) + b"\n")
    console.print(f"wrote {private} (keep it here) and {public}")
    console.print(
        f"coordinator: invcoss-server enroll --config federation.toml --site {site} --public-key {public.name}"
    )


def _stage_configs(cfg: SiteConfig) -> list[StageConfig]:
    configs = []
    for path in sorted((cfg.work_dir / "runs").glob("*/stage-*/stage-config.json")):
        try:
            configs.append(StageConfig.model_validate_json(path.read_text()))
        except ValueError:
            continue
    return configs or [build_config("tiny", cfg.stage)]


@app.command()
def audit(
    site: Annotated[str, typer.Option("--site", help="This site's name.")],
    config: Annotated[Path, typer.Option("--config", "-c", help="site.toml of this site.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    also: Annotated[
        list[Path] | None,
        typer.Option("--also-audit-log", help="Other sites' audit.jsonl to check against this site's data too."),
    ] = None,
) -> None:
    """Measure whether any real image left this site, and show each stage's membership-inference audit.

    Hashes every file in the data folder, every preprocessed image/volume and every training sample (patch,
    slice, sub-volume) as float32 and float16, and compares them with every array, tensor and pool image
    digest in the outbound audit log. Exit code 1 when any match is found. Then lists the privacy audit of every
    stage this site ran (from its signed manifests; held hand-offs included).
    """
    cfg = _load(config, site)
    setup_logging("warning")
    real = real_data_digests(cfg.data_dir, cfg.modality, _stage_configs(cfg))
    logs = [AuditLog(cfg.work_dir / AUDIT_FILE), *(AuditLog(p) for p in also or [])]
    result = {"site": cfg.site, "modality": cfg.modality, **measure_leaks(logs, real)}
    result["privacy"] = stage_privacy(cfg.work_dir)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        console.print(
            f"site {cfg.site}: {result['outbound_messages']} outbound messages, {result['digests_out']} digests out; "
            f"{result['real_files']} files, {result['real_images']} images/volumes, {result['real_samples']} "
            f"samples hashed; real image tensors out: {result['real_image_tensors_out']}"
        )
        for row in result["privacy"]:
            try:
                line = privacy_line(PrivacyReport.model_validate(row["privacy"]))
            except ValueError as err:
                line = f"unreadable privacy section ({err.__class__.__name__})"
            console.print(f"  run {escape(str(row['run_id']))} stage {row['stage']}: privacy audit {escape(line)}")
    raise typer.Exit(1 if result["real_image_tensors_out"] else 0)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
