"""Hand-off artifact: the only thing that crosses sites (safetensors files + manifest.json + signature).

One reader and one writer serve the directory form and the wire form (a mapping of file name to bytes):
`encode_artifact` builds the files, `decode_artifact` verifies and parses them, `write_artifact_dir` /
`read_artifact_dir` move them to and from disk. Nothing here unpickles anything.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from invcoss_core.common.signing import PublicKey, verify_bytes
from invcoss_core.config import ModelConfig, WeightsDtype
from invcoss_core.privacy.report import PrivacyReport

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
WEIGHTS = "weights.safetensors"
STATS = "stats.safetensors"
SYNTHETIC = "synthetic.safetensors"
REAL_BUFFER = "real_buffer.safetensors"  # MedCoSS baseline only: real images, never accepted by a site
_SAFE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}\.safetensors$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_FILE_BYTES = 8 << 30
_WEIGHT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class ArtifactError(ValueError):
    """An artifact is malformed, modified, unsigned, replayed or out of order; the message says which."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Frozen):
    """Size and digest of one artifact file."""

    sha256: str
    bytes: int = Field(ge=0, le=MAX_FILE_BYTES)

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not _HEX64.match(value):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return value


class GateSummary(_Frozen):
    """What the privacy gate measured before the synthetic images left the site."""

    checked: int = Field(ge=0)  # synthetic images compared with the real training set
    blocked: int = Field(ge=0)  # images found above a threshold (regenerated or dropped)
    dropped: int = Field(0, ge=0)  # blocked images that did not leave the site
    regenerated: int = Field(0, ge=0)  # replacement images synthesised for blocked ones (each was checked again)
    threshold: dict[str, float]  # {"pixel": normalised correlation, "feature": encoder cosine}
    max_similarity: dict[str, float]  # the largest similarity of any image that left, per measure
    quantiles: dict[str, list[float]] = Field(default_factory=dict)  # 50/90/99/100 % of nearest-real similarity


class Manifest(_Frozen):
    """manifest.json: describes and hashes every file of the artifact."""

    format_version: Literal[1] = 1
    run_id: str = Field(min_length=1, max_length=128)
    stage_index: int = Field(ge=1)  # 1 for the first stage of a run
    site: str = Field(min_length=1, max_length=64)
    modalities: list[str] = Field(min_length=1)  # trained so far, in order; the last is this stage's
    profile: str
    replay: str
    parent_sha256: str | None  # manifest sha256 of the artifact this stage started from
    files: dict[str, FileEntry]
    synthetic: dict[str, int]  # synthetic images per modality in synthetic.safetensors
    privacy_gate: GateSummary | None
    created_at: str
    architecture: ModelConfig  # enough to rebuild the model that reads weights.safetensors
    contains_real_data: bool = False  # True only for the local real_buffer baseline
    metrics: dict[str, float] = Field(default_factory=dict)  # stage summary numbers (no patient data)
    precision: Literal["float32", "bfloat16"] | None = None  # the stage's training precision; None: not recorded
    weights_dtype: WeightsDtype = "float32"  # floating weights as stored in weights.safetensors (hand-off size)
    privacy: PrivacyReport | None = None  # the site's membership-inference audit and policy decision (figures only)

    @field_validator("parent_sha256")
    @classmethod
    def _parent_hex(cls, value: str | None) -> str | None:
        if value is not None and not _HEX64.match(value):
            raise ValueError("parent_sha256 must be 64 lowercase hex digits or null")
        return value

    @field_validator("files")
    @classmethod
    def _file_names(cls, value: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in value:
            if not _SAFE_NAME.match(name):
                raise ValueError(f"file name {name!r} is not an allowed artifact file name")
        for required in (WEIGHTS, STATS, SYNTHETIC):
            if required not in value:
                raise ValueError(f"files must list {required}")
        return value


@dataclass(frozen=True)
class Artifact:
    """A verified, parsed hand-off artifact."""

    manifest: Manifest
    weights: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]
    synthetic: dict[str, torch.Tensor]  # modality -> (N, C, *img_size) float16 in [0, 1]
    extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # e.g. "ewc", "real_buffer"
    manifest_bytes: bytes = b""
    signed: bool = False

    @property
    def sha256(self) -> str:
        """Digest of manifest.json: the artifact's identity in a parent chain."""
        return sha256_hex(self.manifest_bytes)


def sha256_hex(data: bytes) -> str:
    """Lowercase hex SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def _tensor_file(tensors: Mapping[str, torch.Tensor]) -> bytes:
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return st_save(clean, metadata={"format": "pt"})


def encode_artifact(
    *,
    run_id: str,
    stage_index: int,
    site: str,
    modalities: list[str],
    profile: str,
    replay: str,
    parent_sha256: str | None,
    architecture: ModelConfig,
    weights: Mapping[str, torch.Tensor],
    stats: Mapping[str, torch.Tensor],
    synthetic: Mapping[str, torch.Tensor],
    extras: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    privacy_gate: GateSummary | None = None,
    metrics: Mapping[str, float] | None = None,
    signer: Callable[[bytes], bytes] | None = None,
    privacy: PrivacyReport | None = None,
    created_at: str | None = None,
    precision: Literal["float32", "bfloat16"] | None = None,
    weights_dtype: WeightsDtype = "float32",
) -> dict[str, bytes]:
    """Serialise an artifact into its files (name -> bytes).

    Args:
        synthetic: modality -> (N, C, *img_size) images; stored as float16.
        extras: name -> tensors, written as `<name>.safetensors` (e.g. EWC Fisher, the real buffer).
        signer: signs manifest.json's bytes (the site's private key); None leaves the artifact unsigned.
        precision: what the stage trained in ("bfloat16" autocast on a GPU, "float32"); None: not recorded.
        weights_dtype: the dtype floating weights are stored in; "float16"/"bfloat16" halve the weights' bytes
            (a receiver loads them into its float32 model). Recorded in the manifest.
    Returns:
        {file name: bytes}, including manifest.json and (when signed) manifest.sig.
    Raises:
        ArtifactError: for non-finite weights or a synthetic pool of the wrong rank.
    """
    dtype = _WEIGHT_DTYPES[weights_dtype]
    stored = {k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    for name, tensor in stored.items():  # after the cast: float16 overflows to inf above 65504
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ArtifactError(
                f"weight {name} holds NaN or inf (as {weights_dtype}); refusing to hand off a broken model"
            )
    pools: dict[str, torch.Tensor] = {}
    for modality, images in synthetic.items():
        spec = architecture.spec(modality)
        if tuple(images.shape[1:]) != spec.input_shape:
            raise ArtifactError(
                f"synthetic pool {modality} has shape {tuple(images.shape)}; expected (N, {spec.input_shape})"
            )
        pools[modality] = images.to(torch.float16)
    files: dict[str, bytes] = {
        WEIGHTS: _tensor_file(stored),
        STATS: _tensor_file(stats),
        SYNTHETIC: _tensor_file(pools),
    }
    contains_real = False
    for name, tensors in (extras or {}).items():
        file_name = f"{name}.safetensors"
        files[file_name] = _tensor_file(tensors)
        contains_real = contains_real or file_name == REAL_BUFFER
    manifest = Manifest(
        run_id=run_id,
        stage_index=stage_index,
        site=site,
        modalities=list(modalities),
        profile=profile,
        replay=replay,
        parent_sha256=parent_sha256,
        files={n: FileEntry(sha256=sha256_hex(b), bytes=len(b)) for n, b in sorted(files.items())},
        synthetic={m: int(t.shape[0]) for m, t in pools.items()},
        privacy_gate=privacy_gate,
        created_at=created_at or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        architecture=architecture,
        contains_real_data=contains_real,
        metrics=dict(metrics or {}),
        precision=precision,
        weights_dtype=weights_dtype,
        privacy=privacy,
    )
    manifest_bytes = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True).encode()
    files[MANIFEST] = manifest_bytes
    if signer is not None:
        files[SIGNATURE] = signer(manifest_bytes)
    return files


def _load_tensors(name: str, data: bytes) -> dict[str, torch.Tensor]:
    try:
        return dict(st_load(data))
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise ArtifactError(f"{name} is not a valid safetensors file: {err}") from None


_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _all_finite(tensor: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """`torch.isfinite(tensor).all()` a few million elements at a time: on a whole `base` pool its temporaries
    (absolute value, comparisons) took 440 MB beside the pool itself."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def _tensor_views(name: str, data: bytes) -> dict[str, torch.Tensor]:
    """Read-only tensors that share `data`'s memory (no copy): for checks whose tensors never leave this module.

    Raises:
        ArtifactError: for a file that is not safetensors of a known dtype with in-bounds offsets.
    """
    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        start = 8 + header_len
        views: dict[str, torch.Tensor] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": these views are only read
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
                shape = [int(d) for d in entry["shape"]]
                begin, end = (int(o) for o in entry["data_offsets"])
                count = math.prod(shape)
                if not 0 <= begin <= end <= len(data) - start or end - begin != count * dtype.itemsize:
                    raise ValueError(f"tensor {key} lies outside the file or has the wrong size")
                flat = (
                    torch.frombuffer(data, dtype=dtype, count=count, offset=start + begin)
                    if count
                    else torch.empty(0, dtype=dtype)
                )
                views[key] = flat.view(shape)
        return views
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise ArtifactError(f"{name} is not a valid safetensors file: {err}") from None


def decode_artifact(
    files: Mapping[str, bytes],
    *,
    public_key: PublicKey | None = None,
    require_signature: bool = False,
    source: str = "artifact",
    keep_tensors: bool = True,
) -> Artifact:
    """Verify and parse an artifact's files.

    Checks, in order: manifest schema, the exact file set, every file's size and sha256, the signature (when a
    key is given or required), tensor parsing, finite weights, synthetic counts and shapes.

    Args:
        files: file name -> bytes (a directory's content or a message's payload).
        public_key: the sending site's enrolled key; the signature must verify against it.
        require_signature: refuse an unsigned artifact even when no key is given.
        source: used in error messages (a path or a message id).
        keep_tensors: False checks the same things on views of `files` and returns the artifact without its
            tensors (empty weights, stats, synthetic and extras): what a holder that only forwards the files needs,
            at no memory beyond the files (a copy of every tensor doubled the coordinator's peak at `base`).
    Raises:
        ArtifactError: naming what failed.
    """
    if MANIFEST not in files:
        raise ArtifactError(f"{source}: {MANIFEST} is missing")
    manifest_bytes = files[MANIFEST]
    try:
        manifest = Manifest.model_validate(json.loads(manifest_bytes))
    except (ValueError, ValidationError) as err:
        raise ArtifactError(f"{source}: {MANIFEST} is malformed: {err}") from None
    expected = set(manifest.files) | {MANIFEST, SIGNATURE}
    unexpected = sorted(set(files) - expected)
    if unexpected:
        raise ArtifactError(f"{source}: unexpected files not listed in the manifest: {unexpected}")
    for name, entry in manifest.files.items():
        if name not in files:
            raise ArtifactError(f"{source}: {name} is listed in the manifest but missing")
        data = files[name]
        if len(data) != entry.bytes or sha256_hex(data) != entry.sha256:
            raise ArtifactError(f"{source}: {name} does not match its manifest sha256/size (modified or corrupt)")
    signed = False
    if public_key is not None or require_signature:
        signature = files.get(SIGNATURE)
        if signature is None:
            raise ArtifactError(
                f"{source}: unsigned artifact ({SIGNATURE} missing); only signed hand-offs are accepted"
            )
        if public_key is None:
            raise ArtifactError(f"{source}: no public key to verify the signature of site {manifest.site!r}")
        if not verify_bytes(public_key, manifest_bytes, signature):
            raise ArtifactError(
                f"{source}: signature does not verify with the key this artifact was checked against "
                f"(the manifest claims site {manifest.site!r}): forged, modified, or signed by another site"
            )
        signed = True
    load = _load_tensors if keep_tensors else _tensor_views
    weights = load(WEIGHTS, files[WEIGHTS])
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not _all_finite(tensor):
            raise ArtifactError(f"{source}: weight {name} holds NaN or inf")
        if tensor.is_floating_point() and tensor.dtype != _WEIGHT_DTYPES[manifest.weights_dtype]:
            raise ArtifactError(
                f"{source}: weight {name} is {tensor.dtype}, the manifest says {manifest.weights_dtype}"
            )
    synthetic = load(SYNTHETIC, files[SYNTHETIC])
    if {m: int(t.shape[0]) for m, t in synthetic.items()} != manifest.synthetic:
        raise ArtifactError(f"{source}: synthetic pool counts differ from the manifest")
    for modality, images in synthetic.items():
        spec = manifest.architecture.spec(modality)
        if images.dtype != torch.float16 or tuple(images.shape[1:]) != spec.input_shape:
            raise ArtifactError(
                f"{source}: synthetic pool {modality} has dtype/shape {images.dtype}/{tuple(images.shape)}"
            )
        if not _all_finite(images):
            raise ArtifactError(f"{source}: synthetic pool {modality} holds NaN or inf")
    extras = {
        name[: -len(".safetensors")]: load(name, files[name])
        for name in manifest.files
        if name not in (WEIGHTS, STATS, SYNTHETIC)
    }
    stats = load(STATS, files[STATS])
    if not keep_tensors:
        weights, stats, synthetic, extras = {}, {}, {}, {}
    return Artifact(
        manifest=manifest,
        weights=weights,
        stats=stats,
        synthetic=synthetic,
        extras=extras,
        manifest_bytes=manifest_bytes,
        signed=signed,
    )


def check_lineage(
    artifact: Artifact,
    *,
    run_id: str,
    stage_index: int,
    parent_sha256: str | None,
    site: str | None = None,
) -> None:
    """Refuse an artifact that is not the expected next link of a run's chain.

    Args:
        run_id: the run it must belong to.
        stage_index: the stage it must report.
        parent_sha256: manifest digest of the artifact that stage started from (None for stage 1).
        site: the site that must have produced it.
    Raises:
        ArtifactError: for a replayed (older stage), reordered, foreign-run or wrong-parent artifact.
    """
    m = artifact.manifest
    if m.run_id != run_id:
        raise ArtifactError(f"artifact belongs to run {m.run_id!r}, not {run_id!r}")
    if m.stage_index != stage_index:
        kind = "replayed older" if m.stage_index < stage_index else "out-of-order"
        raise ArtifactError(f"{kind} artifact: stage {m.stage_index} where stage {stage_index} was expected")
    if m.parent_sha256 != parent_sha256:
        raise ArtifactError(
            f"artifact of stage {stage_index} names parent {m.parent_sha256} but the chain's previous artifact "
            f"is {parent_sha256}"
        )
    if site is not None and m.site != site:
        raise ArtifactError(f"artifact of stage {stage_index} comes from site {m.site!r}, expected {site!r}")


def write_artifact_dir(files: Mapping[str, bytes], out_dir: Path) -> Path:
    """Write an artifact's files atomically: a temporary sibling directory renamed into place.

    Raises:
        ArtifactError: when `out_dir` exists and is not an artifact directory (never overwrites other data).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists():
        raise ArtifactError(f"{out_dir} exists and is not an artifact directory; choose an empty or new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_artifact_files(path: Path) -> dict[str, bytes]:
    """The raw files of an artifact directory (no verification; see `decode_artifact`).

    Raises:
        ArtifactError: when the path is not a readable artifact directory.
    """
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise ArtifactError(f"{path} is not an artifact directory ({MANIFEST} not found)")
    files: dict[str, bytes] = {}
    for child in sorted(path.iterdir()):
        if child.name.startswith("."):
            continue
        if not child.is_file():
            raise ArtifactError(f"{path}: unexpected entry {child.name} in an artifact directory")
        files[child.name] = child.read_bytes()
    return files


class ArtifactFiles(Mapping[str, bytes]):
    """An artifact directory's files, read from disk when asked, whole or a slice at a time.

    What a holder that only forwards an artifact needs (the coordinator sending a verified parent in parts): it never
    holds more than the slice it sends. The names and sizes are taken when it is made; the receiver verifies
    signature and hashes of what arrives, so a file changed on disk afterwards is refused there.
    """

    def __init__(self, path: Path) -> None:
        """Raises: ArtifactError when the path is not an artifact directory."""
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise ArtifactError(f"{self.path} is not an artifact directory ({MANIFEST} not found)")
        self.sizes = {
            child.name: child.stat().st_size
            for child in sorted(self.path.iterdir())
            if not child.name.startswith(".") and child.is_file()
        }

    def __getitem__(self, name: str) -> bytes:
        if name not in self.sizes:
            raise KeyError(name)
        return (self.path / name).read_bytes()

    def __iter__(self) -> Iterator[str]:
        return iter(self.sizes)

    def __len__(self) -> int:
        return len(self.sizes)

    def read(self, name: str, offset: int, length: int) -> bytes:
        """`length` bytes of file `name` from `offset`.

        Raises:
            ArtifactError: when the file is shorter than that now.
        """
        with open(self.path / name, "rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
        if len(data) != length:
            raise ArtifactError(f"{self.path / name} changed on disk while it was being sent")
        return data


def file_sizes(files: Mapping[str, bytes]) -> dict[str, int]:
    """Bytes per file, without reading an `ArtifactFiles` from disk."""
    return dict(files.sizes) if isinstance(files, ArtifactFiles) else {n: len(b) for n, b in files.items()}


def file_slice(files: Mapping[str, bytes], name: str, offset: int, length: int) -> bytes:
    """A slice of one file (from disk for an `ArtifactFiles`, else a copy of just that slice)."""
    if isinstance(files, ArtifactFiles):
        return files.read(name, offset, length)
    return bytes(memoryview(files[name])[offset : offset + length])


def read_artifact_dir(path: Path, *, public_key: PublicKey | None = None, require_signature: bool = False) -> Artifact:
    """Read and verify an artifact directory (see `decode_artifact`)."""
    return decode_artifact(
        read_artifact_files(path), public_key=public_key, require_signature=require_signature, source=str(path)
    )


def manifest_summary(artifact: Artifact) -> dict[str, Any]:
    """A JSON-friendly summary for logs and reports (no tensors, no patient data)."""
    m = artifact.manifest
    return {
        "sha256": artifact.sha256,
        "run_id": m.run_id,
        "stage_index": m.stage_index,
        "site": m.site,
        "modalities": m.modalities,
        "synthetic": m.synthetic,
        "bytes": sum(e.bytes for e in m.files.values()),
        "signed": artifact.signed,
    }
