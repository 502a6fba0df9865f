"""Hand-off artifact: exact round trip, tamper detection, signatures, lineage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from invcoss_core.artifact import (
    MANIFEST,
    SIGNATURE,
    STATS,
    SYNTHETIC,
    WEIGHTS,
    ArtifactError,
    GateSummary,
    check_lineage,
    decode_artifact,
    encode_artifact,
    read_artifact_dir,
    write_artifact_dir,
)
from invcoss_core.common.signing import generate_private_key, sign_bytes
from invcoss_core.config import build_config
from invcoss_core.models import build_model


def _files(stage: int = 1, parent: str | None = None, signer=None, **kw):  # type: ignore[no-untyped-def]
    cfg = build_config("tiny").model
    torch.manual_seed(0)
    weights = build_model(cfg).state_dict()
    args = dict(
        run_id="run-1",
        stage_index=stage,
        site="A",
        modalities=["ct"],
        profile="tiny",
        replay="inversion",
        parent_sha256=parent,
        architecture=cfg,
        weights=weights,
        stats={"ct.block0.mean": torch.randn(32), "ct.block0.var": torch.rand(32)},
        synthetic={"ct": torch.rand(5, 1, 16, 16, 16)},
        privacy_gate=GateSummary(checked=5, blocked=1, threshold={"pixel": 0.9}, max_similarity={"pixel": 0.5}),
        signer=signer,
    )
    args.update(kw)
    return encode_artifact(**args), weights


def test_round_trip_is_exact(tmp_path: Path) -> None:
    files, weights = _files()
    write_artifact_dir(files, tmp_path / "a")
    art = read_artifact_dir(tmp_path / "a")
    assert set(art.weights) == set(weights)
    assert all(torch.equal(art.weights[k], v) for k, v in weights.items())
    assert art.synthetic["ct"].dtype == torch.float16 and art.synthetic["ct"].shape == (5, 1, 16, 16, 16)
    assert art.manifest.synthetic == {"ct": 5} and art.manifest.privacy_gate is not None
    assert art.manifest.files[WEIGHTS].bytes == len(files[WEIGHTS])
    # Re-encoding the parsed content gives identical tensor files.
    again, _ = _files()
    assert again[WEIGHTS] == files[WEIGHTS] and again[SYNTHETIC] == files[SYNTHETIC]


def test_manifest_has_the_design_fields() -> None:
    files, _ = _files()
    manifest = json.loads(files[MANIFEST])
    for key in (
        "format_version",
        "run_id",
        "stage_index",
        "site",
        "modalities",
        "profile",
        "parent_sha256",
        "files",
        "synthetic",
        "privacy_gate",
        "created_at",
    ):
        assert key in manifest
    assert set(manifest["privacy_gate"]) >= {"checked", "blocked", "threshold", "max_similarity"}


@pytest.mark.parametrize("name", [WEIGHTS, STATS, SYNTHETIC, MANIFEST])
def test_one_flipped_byte_is_refused(name: str) -> None:
    files, _ = _files()
    data = bytearray(files[name])
    data[len(data) // 2] ^= 0x01
    files[name] = bytes(data)
    with pytest.raises(ArtifactError):
        decode_artifact(files)


def test_flipped_byte_on_disk_is_refused(tmp_path: Path) -> None:
    files, _ = _files()
    out = write_artifact_dir(files, tmp_path / "a")
    raw = bytearray((out / WEIGHTS).read_bytes())
    raw[-1] ^= 0xFF
    (out / WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"weights\.safetensors does not match"):
        read_artifact_dir(out)


def test_missing_and_unexpected_files_are_refused() -> None:
    files, _ = _files()
    with pytest.raises(ArtifactError, match="missing"):
        decode_artifact({k: v for k, v in files.items() if k != STATS})
    with pytest.raises(ArtifactError, match="unexpected"):
        decode_artifact({**files, "extra.safetensors": b"x"})


def test_signature_verifies_and_forgery_is_refused() -> None:
    key, other = generate_private_key(), generate_private_key()
    files, _ = _files(signer=lambda b: sign_bytes(key, b))
    assert decode_artifact(files, public_key=key.public_key()).signed
    with pytest.raises(ArtifactError, match="signature does not verify"):
        decode_artifact(files, public_key=other.public_key())
    # A modified manifest re-hashed by an attacker still fails the signature.
    manifest = json.loads(files[MANIFEST])
    manifest["site"] = "B"
    forged = {**files, MANIFEST: json.dumps(manifest).encode()}
    with pytest.raises(ArtifactError, match="signature"):
        decode_artifact(forged, public_key=key.public_key())


def test_unsigned_artifact_refused_when_signature_required() -> None:
    files, _ = _files()
    with pytest.raises(ArtifactError, match="unsigned"):
        decode_artifact(files, require_signature=True)
    key = generate_private_key()
    with pytest.raises(ArtifactError, match=SIGNATURE):
        decode_artifact(files, public_key=key.public_key())


def test_lineage_refuses_replayed_reordered_and_wrong_parent() -> None:
    first_files, _ = _files(stage=1)
    first = decode_artifact(first_files)
    second = decode_artifact(_files(stage=2, parent=first.sha256)[0])
    check_lineage(second, run_id="run-1", stage_index=2, parent_sha256=first.sha256, site="A")
    with pytest.raises(ArtifactError, match="replayed older"):
        check_lineage(first, run_id="run-1", stage_index=2, parent_sha256=first.sha256)
    with pytest.raises(ArtifactError, match="out-of-order"):
        check_lineage(second, run_id="run-1", stage_index=1, parent_sha256=None)
    with pytest.raises(ArtifactError, match="parent"):
        check_lineage(second, run_id="run-1", stage_index=2, parent_sha256="0" * 64)
    with pytest.raises(ArtifactError, match="run"):
        check_lineage(second, run_id="run-2", stage_index=2, parent_sha256=first.sha256)
    with pytest.raises(ArtifactError, match="site"):
        check_lineage(second, run_id="run-1", stage_index=2, parent_sha256=first.sha256, site="B")


def test_non_finite_weights_are_refused_both_ways() -> None:
    _, weights = _files()
    bad = dict(weights)
    key = next(k for k, v in bad.items() if v.is_floating_point())
    bad[key] = bad[key].clone()
    bad[key].view(-1)[0] = float("nan")
    with pytest.raises(ArtifactError, match="NaN"):
        _files(weights=bad)


def test_wrong_synthetic_shape_is_refused() -> None:
    with pytest.raises(ArtifactError, match="synthetic pool ct"):
        _files(synthetic={"ct": torch.rand(2, 1, 8, 8, 8)})


def test_write_refuses_to_overwrite_a_non_artifact_folder(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.nii.gz").write_bytes(b"x")
    files, _ = _files()
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        write_artifact_dir(files, tmp_path / "data")
    assert (tmp_path / "data" / "precious.nii.gz").exists()


def test_rewrite_replaces_an_artifact_atomically(tmp_path: Path) -> None:
    files, _ = _files()
    write_artifact_dir(files, tmp_path / "a")
    files2, _ = _files(stage=2, parent="a" * 64)
    write_artifact_dir(files2, tmp_path / "a")
    assert read_artifact_dir(tmp_path / "a").manifest.stage_index == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_not_safetensors_payload_is_refused_cleanly() -> None:
    files, _ = _files()
    # Replace weights with garbage and fix up the hash, as an attacker without the key could.
    from invcoss_core.artifact import sha256_hex

    manifest = json.loads(files[MANIFEST])
    garbage = b"\x00" * 64
    manifest["files"][WEIGHTS] = {"sha256": sha256_hex(garbage), "bytes": len(garbage)}
    tampered = {**files, WEIGHTS: garbage, MANIFEST: json.dumps(manifest).encode()}
    with pytest.raises(ArtifactError, match="not a valid safetensors"):
        decode_artifact(tampered)


def test_garbage_key_files_give_a_clean_error(tmp_path: Path) -> None:
    from invcoss_core.common.signing import SigningKeyError, load_private_key, load_public_key

    bad = tmp_path / "bad.pub"
    bad.write_bytes(b"ssh-foo AAAAB3NzaC1yc2EAAAADAQABAAABAQ== x\n")
    with pytest.raises(SigningKeyError, match=r"bad\.pub"):
        load_public_key(bad)
    bad.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    with pytest.raises(SigningKeyError, match=r"bad\.pub"):
        load_private_key(bad)
    with pytest.raises(SigningKeyError, match="cannot read"):
        load_public_key(tmp_path / "missing.pub")


@pytest.mark.parametrize(("dtype", "tolerance"), [("float16", 1e-3), ("bfloat16", 8e-3)])
def test_half_precision_weights_halve_the_weights_file_and_load_into_a_float32_model(
    dtype: str, tolerance: float
) -> None:
    full, weights = _files()
    half, _ = _files(weights_dtype=dtype)
    art = decode_artifact(half)
    assert art.manifest.weights_dtype == dtype and decode_artifact(full).manifest.weights_dtype == "float32"
    assert len(half[WEIGHTS]) < 0.55 * len(full[WEIGHTS])
    model = build_model(build_config("tiny").model)
    model.load_state_dict(art.weights, strict=True)
    for name, value in model.state_dict().items():
        assert value.dtype == weights[name].dtype
        relative = (value - weights[name]).abs().max() / weights[name].abs().max().clamp_min(1e-12)
        assert float(relative) < tolerance, name


def test_float16_overflow_and_a_dtype_the_manifest_does_not_name_are_refused() -> None:
    _, weights = _files()
    big = dict(weights)
    key = next(k for k, v in big.items() if v.is_floating_point())
    big[key] = big[key] + 1e6
    with pytest.raises(ArtifactError, match="as float16"):
        _files(weights=big, weights_dtype="float16")
    files, _ = _files(weights_dtype="bfloat16")
    manifest = json.loads(files[MANIFEST])
    manifest["weights_dtype"] = "float32"
    files[MANIFEST] = json.dumps(manifest).encode()
    # Re-hashing is not enough: the weights are bfloat16 but the manifest says float32.
    with pytest.raises(ArtifactError, match="the manifest says float32"):
        decode_artifact(files)


def _rehashed(files: dict[str, bytes], name: str, data: bytes) -> dict[str, bytes]:
    """`files` with `name` replaced and the manifest's hash fixed up (as an attacker without the key could)."""
    from invcoss_core.artifact import sha256_hex

    manifest = json.loads(files[MANIFEST])
    manifest["files"][name] = {"sha256": sha256_hex(data), "bytes": len(data)}
    return {**files, name: data, MANIFEST: json.dumps(manifest).encode()}


def test_verifying_without_keeping_tensors_checks_the_same_and_returns_none() -> None:
    from safetensors.torch import save

    files, weights = _files()
    light = decode_artifact(files, keep_tensors=False)
    assert light.sha256 == decode_artifact(files).sha256 and light.manifest.synthetic == {"ct": 5}
    assert light.weights == {} and light.synthetic == {} and light.stats == {}
    bad = {k: v.clone() for k, v in weights.items()}
    key = next(k for k, v in bad.items() if v.is_floating_point())
    bad[key].view(-1)[3] = float("inf")
    for tampered in (
        _rehashed(files, WEIGHTS, save(bad)),
        _rehashed(files, SYNTHETIC, save({"ct": torch.rand(5, 1, 8, 16, 16).half()})),
        _rehashed(files, WEIGHTS, b"\x00" * 64),
        _rehashed(files, WEIGHTS, files[WEIGHTS][:-4]),  # a tensor's bytes cut short
    ):
        with pytest.raises(ArtifactError) as full:
            decode_artifact(tampered)
        with pytest.raises(ArtifactError) as views:
            decode_artifact(tampered, keep_tensors=False)
        assert str(views.value)[:40] == str(full.value)[:40]  # the same check refused it
