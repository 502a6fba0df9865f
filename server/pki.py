"""Federation certificates: a private CA and the SuperLink's TLS server certificate (via `cryptography`).

The SuperLink serves TLS only (Flower 1.42 has no mTLS); sites trust it through the CA certificate (`ca.crt`),
and authenticate themselves with their enrolled EC P-384 keys (node authentication), not with certificates.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
DEFAULT_SANS: tuple[str, ...] = ("localhost", "127.0.0.1")


class CertificateError(ValueError):
    """Certificates cannot be created or read; the message says what to change."""


@dataclass(frozen=True)
class CertificatePaths:
    """Where a federation's TLS material lives."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> CertificatePaths:
        """The standard file names inside `directory`."""
        d = Path(directory)
        return cls(d / CA_CERT, d / CA_KEY, d / SERVER_CERT, d / SERVER_KEY)

    def complete(self) -> bool:
        """True when the CA certificate and the server certificate and key all exist."""
        return self.ca_cert.is_file() and self.server_cert.is_file() and self.server_key.is_file()


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "InvCoSS federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def san_entries(names: list[str] | tuple[str, ...]) -> list[x509.GeneralName]:
    """Subject-alternative-name entries: IP addresses as IPAddress, everything else as DNSName.

    Raises:
        CertificateError: for an empty name.
    """
    entries: list[x509.GeneralName] = []
    for raw in dict.fromkeys(n.strip() for n in names):
        if not raw:
            raise CertificateError("an empty host name cannot be a certificate SAN")
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(raw)))
        except ValueError:
            entries.append(x509.DNSName(raw))
    return entries


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def create_certificates(
    directory: Path,
    sans: list[str] | tuple[str, ...] = DEFAULT_SANS,
    valid_days: int = 365,
    overwrite: bool = False,
) -> CertificatePaths:
    """Create a CA and a SuperLink server certificate signed by it.

    Args:
        directory: output folder (ca.crt, ca.key, server.pem, server.key; keys are written mode 0600).
        sans: every host name and IP address sites and the coordinator use to reach the SuperLink,
            including the address the SuperLink dials itself (127.0.0.1).
        valid_days: certificate lifetime.
        overwrite: replace existing files; otherwise existing complete material is refused.
    Returns:
        The paths of the written files.
    Raises:
        CertificateError: when certificates already exist and `overwrite` is False, or for bad SANs.
    """
    paths = CertificatePaths.in_dir(directory)
    if paths.complete() and not overwrite:
        raise CertificateError(
            f"certificates already exist in {directory}; pass --force to replace them "
            "(sites must then receive the new ca.crt)"
        )
    if valid_days <= 0:
        raise CertificateError(f"valid_days must be positive, got {valid_days}")
    alt_names = san_entries(list(sans) or list(DEFAULT_SANS))
    now = _dt.datetime.now(_dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("InvCoSS federation CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("InvCoSS SuperLink"))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    Path(directory).mkdir(parents=True, exist_ok=True)
    _write_private(paths.ca_key, _key_pem(ca_key))
    _write_private(paths.server_key, _key_pem(server_key))
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return paths


def certificate_sans(path: Path) -> list[str]:
    """The DNS names and IP addresses a PEM certificate is valid for.

    Raises:
        CertificateError: when the file is missing or not a PEM certificate.
    """
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        raise CertificateError(f"cannot read certificate {path}: {err}") from None
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in ext.get_values_for_type(x509.DNSName)] + [
        str(v) for v in ext.get_values_for_type(x509.IPAddress)
    ]
