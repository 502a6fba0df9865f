"""`invcoss` command line for the method core: local stages, embeddings (plus data, samples and bench)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from rich.markup import escape

from invcoss_core.artifact import ArtifactError, read_artifact_dir
from invcoss_core.common.cli_support import console, fail, print_table, setup_logging
from invcoss_core.common.progress import rich_progress
from invcoss_core.common.signing import SigningKeyError, load_public_key
from invcoss_core.config import PROFILES, ConfigError, load_config
from invcoss_core.models import ModelInputError
from invcoss_core.privacy import PrivacyReport, hold_message, privacy_line, split_for_audit
from invcoss_core.replay import ReplayError
from invcoss_core.training import StageError, load_student, run_stage
from invcoss_core.training.checkpoint import CheckpointError

app = typer.Typer(
    name="invcoss",
    help=(
        "InvCoSS: inversion-driven continual self-supervised pre-training for multi-modal medical images.\n\n"
        "Run one local stage (`stage`), extract frozen-encoder features (`embed`), fetch real sample images "
        "(`samples fetch`), check a site folder (`data check`) or compare methods (`bench`). The installed "
        "`invcoss` command (`invcoss.cli`) adds `demo`, the whole federation on this machine."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    ArtifactError,
    StageError,
    CheckpointError,
    SigningKeyError,
    ModelInputError,
    ReplayError,
    FileNotFoundError,
)


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU.

    Raises:
        typer.Exit: when CUDA is asked for but not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise fail("--device cuda was requested but no CUDA device is available; use --device cpu")
    return torch.device(name)


@app.command()
def stage(
    site_data: Annotated[
        Path, typer.Option("--site-data", help="Site image folder: DIR/<modality>/ or the modality folder itself.")
    ],
    modality: Annotated[
        str, typer.Option("--modality", help="Modality trained in this stage: ct, mri, pathology, xray.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory the hand-off artifact is written to (atomically).")],
    profile: Annotated[str, typer.Option("--profile", help=f"Model/training preset: {', '.join(PROFILES)}.")] = "tiny",
    init: Annotated[
        Path | None, typer.Option("--init", help="Artifact of the previous stage to continue from (omit for stage 1).")
    ] = None,
    replay: Annotated[
        str | None,
        typer.Option(
            "--replay",
            help="Replay strategy: none, real_buffer (local only: keeps real images), ewc, inversion (InvCoSS), "
            "pixel_inversion. Default: the config's (none).",
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML file overriding the profile (StageConfig layout).")
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Override train.epochs.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Override the run seed.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    nproc: Annotated[
        int | None,
        typer.Option(
            "--nproc",
            min=1,
            help="Data-parallel training processes (config `devices`): one per GPU (NCCL) or CPU processes (gloo); "
            "the batch is the global batch. Several nodes: start the stage under torchrun instead.",
        ),
    ] = None,
    site: Annotated[str, typer.Option("--site", help="Site name written into the manifest.")] = "local",
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="Run identifier (default: the --init artifact's, or a new one).")
    ] = None,
    trust_key: Annotated[
        Path | None,
        typer.Option("--trust-key", help="Public key of the site that produced --init; its signature must verify."),
    ] = None,
    work_dir: Annotated[
        Path | None, typer.Option("--work-dir", help="Checkpoint folder (default: <out>.work); reruns resume from it.")
    ] = None,
    strict: Annotated[
        bool | None, typer.Option("--strict/--lenient", help="Refuse (strict) or skip and count unreadable images.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning, error.")] = "info",
) -> None:
    """Train one continual stage on a site folder and write its hand-off artifact.

    Stage 1 trains the MAE on the real images of MODALITY. Later stages start from --init, train on the new
    modality and replay the earlier ones as the replay strategy says; `inversion` then synthesises images of
    this modality, passes them through the privacy gate and puts them in the artifact for the next stage.
    """
    from invcoss_core.data import SiteDataError, load_site_dataset

    stage_errors: tuple[type[Exception], ...] = (*USER_ERRORS, SiteDataError)
    setup_logging(log_level)
    overrides: dict[str, Any] = {}
    if replay is not None:
        overrides["replay"] = {"strategy": replay}
    if epochs is not None:
        overrides["train"] = {"epochs": epochs}
    if seed is not None:
        overrides["seed"] = seed
    if nproc is not None:
        overrides["devices"] = nproc
    if strict is not None:
        overrides["data"] = {"strict": strict}
    try:
        cfg = load_config(config, profile=profile, overrides=overrides)
        spec = cfg.model.spec(modality)
        incoming = None
        if init is not None:
            key = load_public_key(trust_key) if trust_key is not None else None
            incoming = read_artifact_dir(init, public_key=key)
            if incoming.manifest.contains_real_data and cfg.replay.strategy != "real_buffer":
                raise fail(f"{init} contains real images (real_buffer baseline); continue it with --replay real_buffer")
        dataset = load_site_dataset(site_data, modality, spec, cfg.data, split="train", seed=cfg.seed)
        train_data, audit = split_for_audit(dataset, cfg.privacy.audit_fraction, cfg.seed)
        report = dataset.report
        console.print(
            f"[bold]{modality}[/]: {len(train_data)} training samples from {report.files_loaded} files "
            f"({report.files_rejected} rejected; {audit.split.audit_subjects} subjects held out for the privacy audit)"
        )
        resolved_run = run_id or (incoming.manifest.run_id if incoming else uuid.uuid4().hex[:12])
        with rich_progress(console, enabled=not quiet) as sink:
            result = run_stage(
                config=cfg,
                modality=modality,
                train_data=train_data,
                incoming=incoming,
                run_id=resolved_run,
                site=site,
                out_dir=out,
                work_dir=work_dir or out.with_name(out.name + ".work"),
                device=resolve_device(device),
                events=sink,
                audit=audit,
            )
    except stage_errors as err:
        raise fail(str(err)) from None
    privacy = result.artifact.manifest.privacy
    held = hold_message(privacy) if privacy is not None else None
    if held is not None:  # a site client would not hand this artifact off (site_client/runner.py)
        console.print(f"[bold yellow]warning:[/] {escape(held)}")
    _print_stage_summary(result.artifact.manifest.model_dump(mode="json"), result.artifact.sha256, out, result)


def _print_stage_summary(manifest: dict[str, Any], sha: str, out: Path, result: Any) -> None:
    rows = [
        ("modalities", " → ".join(manifest["modalities"])),
        ("replay", manifest["replay"]),
        ("epoch losses", ", ".join(f"{x:.4f}" for x in result.epoch_losses)),
    ]
    if result.replay_losses:
        rows.append(("replay losses", ", ".join(f"{x:.4g}" for x in result.replay_losses)))
    rows.append(("train time", f"{result.train_seconds:.1f} s ({result.images_per_second:.1f} images/s)"))
    if result.replay_seconds:
        rows.append(("replay/inversion time", f"{result.replay_seconds:.1f} s"))
    rows.append(("synthetic images", json.dumps(manifest["synthetic"])))
    if manifest.get("privacy_gate"):
        gate = manifest["privacy_gate"]
        rows.append(
            ("privacy gate", f"checked {gate['checked']}, blocked {gate['blocked']}, dropped {gate['dropped']}")
        )
    if manifest.get("privacy"):
        rows.append(("privacy audit", privacy_line(PrivacyReport.model_validate(manifest["privacy"]))))
    rows.append(("artifact bytes", str(sum(f["bytes"] for f in manifest["files"].values()))))
    rows.append(("manifest sha256", sha))
    print_table(f"stage {manifest['stage_index']} → {out}", ("field", "value"), rows, show_header=False)


@app.command()
def embed(
    model: Annotated[Path, typer.Option("--model", help="Artifact directory (a stage output or the final model).")],
    images: Annotated[Path, typer.Option("--images", help="Folder of image files (one feature vector per file).")],
    modality: Annotated[str, typer.Option("--modality", help="Which tokenizer to use: ct, mri, pathology, xray.")],
    out: Annotated[Path, typer.Option("--out", help="Output .npz with keys `names` and `features` (N, D).")],
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Skip unreadable files (listed at the end) instead of stopping.")
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 32,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    trust_key: Annotated[
        Path | None, typer.Option("--trust-key", help="Public key whose signature the artifact must carry.")
    ] = None,
) -> None:
    """Frozen-encoder features of every image file in a folder (the model's own preprocessing).

    Each file is read, preprocessed as in training (intensity window/normalisation, centre crop or resize to
    the modality's input size) and encoded without masking; the feature is the mean of the patch tokens.
    """
    from invcoss_core.data import ImageReadError, discover_images, load_image_for_embedding

    setup_logging("warning")
    try:
        key = load_public_key(trust_key) if trust_key is not None else None
        artifact = read_artifact_dir(model, public_key=key)
        dev = resolve_device(device)
        net = load_student(artifact, dev)
        spec = net.spec(modality)
    except USER_ERRORS as err:
        raise fail(str(err)) from None
    if not images.is_dir():
        raise fail(f"--images {images} is not a folder")
    # A DICOM series folder is one volume for 3-D modalities: discovery groups its slice files.
    found = discover_images(images, group_dicom_series=spec.spatial_dims == 3)
    if found.rejected and not skip_bad:
        name, reason = found.rejected[0]
        raise fail(f"{name}: {reason} (use --skip-bad to skip unreadable files)")
    skipped: list[tuple[str, str]] = list(found.rejected)
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    for source in found.sources:
        target = source.paths[0] if len(source.paths) == 1 else source.paths[0].parent
        try:
            tensors.append(load_image_for_embedding(target, modality, spec))
            names.append(source.name)
        except ImageReadError as err:
            if not skip_bad:
                raise fail(f"{source.name}: {err} (use --skip-bad to skip unreadable files)") from None
            skipped.append((source.name, str(err)))
    if not tensors:
        raise fail(f"no readable {modality} image in {images}")
    features = []
    with torch.no_grad():
        for i in range(0, len(tensors), batch_size):
            features.append(net.embed(torch.stack(tensors[i : i + batch_size]).to(dev), modality).cpu())
    feats = torch.cat(features).numpy().astype(np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, names=np.array(names), features=feats)
    console.print(f"wrote {feats.shape[0]} × {feats.shape[1]} features to {out}")
    for name, reason in skipped:
        console.print(f"[yellow]skipped[/] {name}: {reason}")


@app.command()
def export(
    model: Annotated[Path, typer.Option("--model", help="Artifact directory (e.g. the federation's final model).")],
    modality: Annotated[str, typer.Option("--modality", help="Whose tokenizer becomes ViT's patch_embedding.")],
    out: Annotated[
        Path, typer.Option("--out", help="Output .safetensors; a .json with the ViT arguments is written beside.")
    ],
    classification: Annotated[
        bool, typer.Option("--classification/--no-classification", help="Include cls_token (ViT classification=True).")
    ] = False,
) -> None:
    """Export one modality's encoder for MONAI fine-tuning (`monai.networks.nets.ViT`, UNETR's `vit`).

    The weights load with strict key matching into `ViT(**json)`; for UNETR load them into `unetr.vit`.
    """
    from safetensors.torch import save_file

    from invcoss_core.models import export_monai_vit_state_dict

    try:
        artifact = read_artifact_dir(model)
        net = load_student(artifact)
        spec = net.spec(modality)
    except USER_ERRORS as err:
        raise fail(str(err)) from None
    cfg = artifact.manifest.architecture
    state = export_monai_vit_state_dict(net, modality, classification=classification)
    vit_args = {
        "in_channels": spec.in_channels,
        "img_size": list(spec.img_size),
        "patch_size": list(spec.patch_size),
        "hidden_size": cfg.hidden_size,
        "mlp_dim": cfg.mlp_dim,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "spatial_dims": spec.spatial_dims,
        "classification": classification,
        "qkv_bias": False,
        "proj_type": "conv",
        "pos_embed_type": "learnable",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata={"format": "pt"})
    out.with_suffix(".json").write_text(json.dumps(vit_args, indent=2))
    console.print(f"wrote {len(state)} tensors to {out} and the ViT arguments to {out.with_suffix('.json')}")


def _mount_subcommands() -> None:
    from invcoss_core.data.cli import data_app, samples_app
    from invcoss_core.evaluation.cli import bench

    app.add_typer(samples_app, name="samples")
    app.add_typer(data_app, name="data")
    app.command("bench")(bench)


_mount_subcommands()


def main() -> None:
    """Entry point of the method's CLI alone (the installed `invcoss` command is `invcoss.cli`, with `demo`)."""
    app()


if __name__ == "__main__":
    main()
