"""`invcoss-server`: run the coordinator, create certificates, enroll sites, show the run status."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from invcoss_core.common.cli_support import console, fail, out_console, print_table, setup_logging, timestamped
from invcoss_core.config import ConfigError
from server.config import FederationConfig, check_site_name, load_federation_config
from server.coordinator import Coordinator, CoordinatorError
from server.handoff import EnrollmentError, enroll_key
from server.pki import DEFAULT_SANS, CertificateError, certificate_sans, create_certificates
from server.state import StateError, StateLayout, load_state
from server.superlink import ControlApi, SuperLinkError

app = typer.Typer(
    name="invcoss-server",
    help=(
        "InvCoSS coordinator. `invcoss-server --config federation.toml` starts a Flower SuperLink (TLS, node "
        "authentication, durable state) and runs the stage plan: each stage's signed artifact is verified, "
        "persisted and forwarded to the next site; a restarted coordinator continues after the last finished "
        "stage. Before the first start: `certs` (CA + server certificate) and `enroll` (each site's public key)."
    ),
    pretty_exceptions_enable=False,
    add_completion=False,
)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="The coordinator's federation.toml.")]


def _load(config: Path) -> FederationConfig:
    try:
        return load_federation_config(config)
    except ConfigError as err:
        raise fail(str(err)) from None


@app.callback(invoke_without_command=True)
def serve(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="federation.toml (plan, SuperLink, retries, metrics).")
    ] = None,
    stay: Annotated[
        bool, typer.Option("--stay", help="Keep the SuperLink and /metrics up after the plan has finished.")
    ] = False,
    new_run: Annotated[
        bool, typer.Option("--new-run", help="Archive the stored run and start the plan from stage 1.")
    ] = False,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning, error.")] = "info",
) -> None:
    """Run the coordinator until the plan is done (exit 0) or failed (exit 1)."""
    if ctx.invoked_subcommand is not None:
        return
    if config is None:
        console.print(ctx.get_help())
        raise fail("--config federation.toml is required to run the coordinator")
    setup_logging(log_level, quiet=("httpx",))  # one line per Control API request is noise
    cfg = _load(config)
    coordinator = Coordinator(cfg, say=timestamped("[cyan]coordinator[/]"))

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        console.print(f"[yellow]received signal {signum}; stopping the SuperLink[/]")
        coordinator.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        state = coordinator.serve(new_run=new_run, stay=stay)
    except (CoordinatorError, StateError, SuperLinkError) as err:
        raise fail(str(err), code=3) from None
    if state.status == "done":
        console.print(f"[green]run {state.run_id} done[/]: final model in {cfg.state_dir / 'final' / 'model'}")
        raise typer.Exit(0)
    if state.status == "failed":
        console.print(f"[bold red]run {state.run_id} failed[/]: {state.error}")
        raise typer.Exit(1)
    raise typer.Exit(4)  # stopped by a signal before the plan finished


@app.command()
def certs(
    out_dir: Annotated[
        Path | None, typer.Option("--dir", help="Output folder (default: the config's superlink.certs_dir).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="federation.toml to read certs_dir from.")
    ] = None,
    san: Annotated[
        list[str] | None,
        typer.Option("--san", help="Extra host name or IP sites use to reach the SuperLink (repeatable)."),
    ] = None,
    days: Annotated[int, typer.Option("--days", min=1, help="Validity in days.")] = 365,
    force: Annotated[bool, typer.Option("--force", help="Replace existing certificates.")] = False,
) -> None:
    """Create the federation CA and the SuperLink's TLS server certificate (ca.crt, server.pem, server.key).

    SANs always include localhost and 127.0.0.1 (the SuperLink dials itself there) plus the config's
    superlink.host/address and every --san. Give sites ca.crt only; keep ca.key offline.
    """
    names = list(DEFAULT_SANS) + list(san or [])
    target = out_dir
    if config is not None:
        cfg = _load(config)
        target = target or cfg.superlink.certs_dir
        names.append(cfg.superlink.dial_address.rsplit(":", 1)[0])
        if cfg.superlink.host not in ("0.0.0.0", "::"):
            names.append(cfg.superlink.host)
    if target is None:
        raise fail("give --dir or --config")
    try:
        paths = create_certificates(target, names, valid_days=days, overwrite=force)
    except CertificateError as err:
        raise fail(str(err)) from None
    console.print(f"wrote {paths.ca_cert} (give to sites), {paths.server_cert}, {paths.server_key}, {paths.ca_key}")
    console.print(f"server certificate valid for: {', '.join(certificate_sans(paths.server_cert))}")


@app.command()
def enroll(
    site: Annotated[str, typer.Option("--site", help="Site name, as in the plan and the site's --site.")],
    public_key: Annotated[Path, typer.Option("--public-key", help="The site's public key (invcoss-client keygen).")],
    config: ConfigOption,
) -> None:
    """Enroll a site: its key may then connect (node authentication) and sign its stage artifacts.

    The key is stored in the state folder; a running coordinator registers it at once, otherwise at its start.
    """
    cfg = _load(config)
    layout = StateLayout(cfg.state_dir)
    try:
        check_site_name(site)
        key_bytes = public_key.read_bytes()
        path = enroll_key(layout, site, key_bytes, str(public_key))
    except (ValueError, OSError, EnrollmentError) as err:
        raise fail(str(err)) from None
    console.print(f"site {site} enrolled: {path}")
    if layout.pid_file.is_file() and (layout.flwr_home / "config.toml").is_file():
        control = ControlApi(layout)
        try:
            control.register(site, path)
            console.print("registered with the running SuperLink")
        except SuperLinkError as err:
            console.print(f"[yellow]not registered now ({err}); it will be at the coordinator's next start[/]")
        finally:
            control.close()


@app.command()
def status(
    config: ConfigOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print run.json as JSON.")] = False,
) -> None:
    """Show the run state: each stage's site, status, attempts, duration and artifact digest."""
    cfg = _load(config)
    try:
        state = load_state(StateLayout(cfg.state_dir))
    except StateError as err:
        raise fail(str(err)) from None
    if state is None:
        raise fail(f"no run yet in {cfg.state_dir}; start one with `invcoss-server --config {config}`", code=1)
    if as_json:
        sys.stdout.write(json.dumps(state.model_dump(mode="json"), indent=2) + "\n")
        return
    rows = [
        (
            str(s.index),
            ", ".join(s.sites) if s.sites else s.site,
            s.modality or "-",
            s.status + (f" ({s.phase})" if s.sites and s.phase and s.status != "done" else ""),
            str(len(s.rounds)) if s.sites else "-",
            str(s.attempts),
            f"{s.seconds:.1f}" if s.seconds is not None else "-",
            (s.artifact_sha256 or "-")[:16],
        )
        for s in state.stages
    ]
    columns = ("stage", "site", "modality", "status", "rounds", "attempts", "seconds", "artifact")
    print_table(f"run {state.run_id}: {state.status}", columns, rows)
    out = out_console  # stdout: the rounds and verdicts are the command's output too
    if state.error:
        console.print(f"[red]error:[/] {state.error}")
    for s in state.stages:
        for r in s.rounds:
            contributions = ", ".join(
                f"{site} {v.num_examples} samples loss {v.loss:.4f}" for site, v in sorted(r.sites.items())
            )
            missing = f"; missing {', '.join(f'{k} ({v})' for k, v in r.missing.items())}" if r.missing else ""
            out.print(f"stage {s.index} round {r.round}: {contributions}{missing}", markup=False)
        for site, verdict in sorted(s.gate_verdicts.items()):
            out.print(
                f"stage {s.index} gate at {site}: {verdict['blocked']} of {verdict['checked']} candidates blocked"
            )
        for line in s.errors:
            console.print(f"stage {s.index}: {line}", soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
