"""Coordinator-side trust decisions on hand-off artifacts: enrolled keys, reply verification, checkpoints.

A stage's artifact is accepted only when (1) its manifest signature verifies with the *enrolled* key of the site
the stage was sent to, (2) every file matches its manifest sha256, (3) it is the expected next link of the run
(run id, stage index, parent manifest digest, producing site) and (4) it carries no real images.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec

from invcoss_core.artifact import (
    Artifact,
    ArtifactError,
    ArtifactFiles,
    check_lineage,
    decode_artifact,
    read_artifact_files,
)
from invcoss_core.common.signing import (
    PublicKey,
    SigningKeyError,
    load_public_key,
    parse_public_key,
    public_key_openssh,
)
from server.state import StateLayout, atomic_write


class EnrollmentError(ValueError):
    """A site is not enrolled, or its key is unusable; the message says how to enroll it."""


def enrolled_key(layout: StateLayout, site: str) -> PublicKey:
    """The enrolled public key of `site`.

    Raises:
        EnrollmentError: when the site is not enrolled or its key file is unreadable.
    """
    path = layout.enrolled_key(site)
    if not path.is_file():
        raise EnrollmentError(
            f"site {site!r} is not enrolled; run `invcoss-server enroll --site {site} --public-key SITE.pub`"
        )
    try:
        return load_public_key(path)
    except SigningKeyError as err:
        raise EnrollmentError(f"enrolled key of site {site!r} is unusable: {err}") from None


def enroll_key(layout: StateLayout, site: str, key_bytes: bytes, source: str) -> Path:
    """Store `site`'s public key (OpenSSH) in the enrollment folder.

    Raises:
        EnrollmentError: when the key is not an EC P-384 public key (the type SuperNode authentication uses).
    """
    try:
        key = parse_public_key(key_bytes, source=source)
    except (SigningKeyError, UnsupportedAlgorithm) as err:
        raise EnrollmentError(f"{source} is not an OpenSSH or PEM public key: {err}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise EnrollmentError(
            f"{source} is not an EC P-384 key; create site keys with `invcoss-client keygen --site {site}`"
        )
    path = layout.enrolled_key(site)
    atomic_write(path, public_key_openssh(key) + b"\n")
    return path


def same_key(a: PublicKey, b: PublicKey) -> bool:
    """True when two public keys are the same key."""
    return public_key_openssh(a) == public_key_openssh(b)


def verify_stage_artifact(
    files: Mapping[str, bytes],
    *,
    public_key: PublicKey,
    run_id: str,
    stage_index: int,
    parent_sha256: str | None,
    site: str,
    modality: str | None = None,
) -> Artifact:
    """Verify a site's stage reply before it becomes the run's checkpoint.

    Raises:
        ArtifactError: naming what failed (signature, hashes, replayed/reordered stage, wrong parent, wrong site,
            wrong modality, real images).
    """
    artifact = decode_artifact(
        files, public_key=public_key, require_signature=True, source=f"stage {stage_index} artifact from site {site}"
    )
    check_lineage(artifact, run_id=run_id, stage_index=stage_index, parent_sha256=parent_sha256, site=site)
    if artifact.manifest.contains_real_data:
        raise ArtifactError(f"stage {stage_index} artifact from site {site} contains real images; refused")
    if modality is not None and artifact.manifest.modalities[-1] != modality:
        raise ArtifactError(
            f"stage {stage_index} artifact from site {site} trained {artifact.manifest.modalities[-1]!r}, "
            f"the plan says {modality!r}"
        )
    return artifact


def load_checkpoint_artifact(
    layout: StateLayout, index: int, site: str, sha256: str | None, keep_tensors: bool = True
) -> tuple[Artifact, Mapping[str, bytes]]:
    """Re-read and re-verify a persisted stage artifact (the parent of the next stage).

    Args:
        keep_tensors: False when the coordinator only forwards the files: the artifact comes without tensors
            (see `decode_artifact`) and the files as an `ArtifactFiles`, read from disk a slice at a time when
            sent, so that after the check nothing of the artifact stays in memory.
    Returns:
        The verified artifact and its raw files (what is forwarded to the next site).
    Raises:
        ArtifactError: when the checkpoint is missing, modified on disk or not the recorded artifact.
        EnrollmentError: when the producing site is no longer enrolled.
    """
    path = layout.checkpoint(index)
    files = read_artifact_files(path)
    artifact = decode_artifact(
        files,
        public_key=enrolled_key(layout, site),
        require_signature=True,
        source=str(path),
        keep_tensors=keep_tensors,
    )
    if sha256 is not None and artifact.sha256 != sha256:
        raise ArtifactError(f"{path} is not the artifact recorded for stage {index} (sha256 differs)")
    if keep_tensors:
        return artifact, files
    sizes = {name: len(data) for name, data in files.items()}
    del files
    on_disk = ArtifactFiles(path)
    if on_disk.sizes != sizes:
        raise ArtifactError(f"{path} changed on disk while it was being verified")
    return artifact, on_disk


def publish_final_model(layout: StateLayout, last_checkpoint: Path, card: Mapping[str, object]) -> Path:
    """Copy the last stage's artifact to `final/model` and write `final/model_card.json` beside it.

    Returns:
        The final model's artifact folder (what `invcoss embed --model` takes).
    """
    target = layout.final / "model"
    tmp = layout.final / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(last_checkpoint, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    atomic_write(layout.final / "model_card.json", json.dumps(card, indent=2, sort_keys=True).encode())
    return target


def node_key_matches(node_public_key: bytes, enrolled: PublicKey) -> bool:
    """True when the key a SuperNode authenticated with is the enrolled key (PEM or OpenSSH bytes)."""
    if not node_public_key:
        return False
    try:
        return same_key(parse_public_key(node_public_key, source="SuperNode key"), enrolled)
    except (SigningKeyError, UnsupportedAlgorithm):
        return False


__all__ = [
    "ArtifactError",
    "EnrollmentError",
    "enroll_key",
    "enrolled_key",
    "load_checkpoint_artifact",
    "node_key_matches",
    "publish_final_model",
    "same_key",
    "verify_stage_artifact",
]
