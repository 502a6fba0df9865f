"""Site signatures over hand-off manifests: EC (P-256/P-384) or Ed25519 keys, PEM or OpenSSH encoded."""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


class SigningKeyError(ValueError):
    """A key file is missing, unreadable or of an unsupported type."""


def _hash_for(curve: ec.EllipticCurve) -> hashes.HashAlgorithm:
    return hashes.SHA384() if curve.key_size >= 384 else hashes.SHA256()


def sign_bytes(private_key: PrivateKey, data: bytes) -> bytes:
    """Sign `data` (ECDSA with SHA-384 on P-384, SHA-256 on smaller curves; or Ed25519).

    Raises:
        SigningKeyError: for an unsupported key type.
    """
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return private_key.sign(data, ec.ECDSA(_hash_for(private_key.curve)))
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return private_key.sign(data)
    raise SigningKeyError(f"unsupported private key type {type(private_key).__name__}; use EC P-384 or Ed25519")


def verify_bytes(public_key: PublicKey, data: bytes, signature: bytes) -> bool:
    """True when `signature` is a valid signature of `data` by the holder of `public_key`."""
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(_hash_for(public_key.curve)))
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, data)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    """A new EC P-384 key: the type Flower's SuperNode authentication uses, so one key serves both."""
    return ec.generate_private_key(ec.SECP384R1())


def load_private_key(path: Path) -> PrivateKey:
    """Read a private key in OpenSSH or PEM (PKCS#8 / traditional) format.

    Raises:
        SigningKeyError: naming the file, when it is missing, encrypted, malformed or of an unsupported type.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise SigningKeyError(f"cannot read private key {path}: {err.strerror}") from None
    key: object
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise SigningKeyError(f"{path} is not an unencrypted OpenSSH or PEM private key: {err}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__}; site keys must be EC P-384 or Ed25519")
    return key


def load_public_key(path: Path) -> PublicKey:
    """Read a public key in OpenSSH (`ecdsa-sha2-nistp384 ...`) or PEM format.

    Raises:
        SigningKeyError: naming the file, when it is missing, malformed or of an unsupported type.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise SigningKeyError(f"cannot read public key {path}: {err.strerror}") from None
    return parse_public_key(data, source=str(path))


def parse_public_key(data: bytes, source: str = "<bytes>") -> PublicKey:
    """Parse OpenSSH or PEM public-key bytes.

    Raises:
        SigningKeyError: naming `source` when the bytes are not a supported public key.
    """
    key: object
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, IndexError, UnsupportedAlgorithm) as err:
        raise SigningKeyError(f"{source} is not an OpenSSH or PEM public key: {err}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise SigningKeyError(f"{source} holds a {type(key).__name__}; site keys must be EC P-384 or Ed25519")
    return key


def public_key_openssh(key: PrivateKey | PublicKey) -> bytes:
    """OpenSSH encoding of a key's public half (what `flwr supernode register` takes)."""
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def private_key_openssh(key: PrivateKey) -> bytes:
    """Unencrypted OpenSSH encoding of a private key (what Flower's SuperNode reads)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
