"""Certificates: a CA and a server certificate whose SANs cover every address, usable by Python's TLS."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from server.pki import CertificateError, certificate_sans, create_certificates


def test_server_certificate_is_signed_by_the_ca_with_the_right_sans(tmp_path: Path) -> None:
    paths = create_certificates(tmp_path, ["localhost", "127.0.0.1", "coordinator", "10.0.0.7"])
    assert set(certificate_sans(paths.server_cert)) == {"localhost", "127.0.0.1", "coordinator", "10.0.0.7"}
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    context = ssl.create_default_context(cafile=str(paths.ca_cert))
    context.load_verify_locations(cafile=str(paths.ca_cert))
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(str(paths.server_cert), str(paths.server_key))
    for key in (paths.server_key, paths.ca_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_existing_certificates_are_not_replaced_without_force(tmp_path: Path) -> None:
    first = create_certificates(tmp_path).ca_cert.read_bytes()
    with pytest.raises(CertificateError, match="--force"):
        create_certificates(tmp_path)
    assert create_certificates(tmp_path, overwrite=True).ca_cert.read_bytes() != first
