"""The hub's private CA and server certificate, made with ``cryptography`` on first start.

Both clients (devices and services) trust ``ca.pem``; the server certificate
covers localhost, 127.0.0.1, ::1 and every ``--host`` name, and is re-issued
when a new name is asked for.  Private keys are written with mode 0600.
"""

import datetime
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

CA_DAYS = 3650
SERVER_DAYS = 825
DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only (created 0600, never widened)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _make_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "devstreams hub CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    write_private(directory / "ca.key", _key_pem(key))
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    log.info("created a new hub CA in %s", directory)
    return cert, key


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    return cert, key  # type: ignore[return-value]


def _server_names(path: Path) -> set[str]:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return set()
    if cert.not_valid_after_utc < _now() + datetime.timedelta(days=30):
        return set()  # about to expire: re-issue
    return {str(v) for v in san.get_values_for_type(x509.DNSName)} | \
           {str(v) for v in san.get_values_for_type(x509.IPAddress)}


def _make_server(directory: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                 names: tuple[str, ...]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=SERVER_DAYS))
            .add_extension(_san(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    write_private(directory / "server.key", _key_pem(key))
    (directory / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    log.info("issued a server certificate for %s", ", ".join(names))


def ensure_tls(directory: Path, hosts: tuple[str, ...] = ()) -> TlsFiles:
    """Create the CA and server certificate if missing, or re-issue for new host names."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "ca.pem").exists() and (directory / "ca.key").exists():
        ca_cert, ca_key = _load_ca(directory)
    else:
        ca_cert, ca_key = _make_ca(directory)
    names = tuple(dict.fromkeys(tuple(h for h in hosts if h) + DEFAULT_NAMES))
    if not set(names) <= _server_names(directory / "server.pem") or not (directory / "server.key").exists():
        _make_server(directory, ca_cert, ca_key, names)
    return TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")


def server_context(files: TlsFiles):
    from devstreams.transport.tls import server_context as tls_server_context
    return tls_server_context(files.server_cert, files.server_key)
