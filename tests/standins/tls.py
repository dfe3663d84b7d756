"""Self-signed TLS certificates for the stand-ins and the tests that talk TLS to them."""

import datetime
import ipaddress
import ssl
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def self_signed(
    dns_names: Iterable[str] = (),
    ips: Iterable[str] = ("127.0.0.1",),
    organization: str = "l402proxy test stand-in",
) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM): ECDSA P-256, IsCA so it can sign itself (and be pinned as the CA),
    serverAuth, the given names as SANs; the shape of LND's own tls.cert."""
    key = ec.generate_private_key(ec.SECP256R1())
    dns = list(dns_names)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, dns[0] if dns else "localhost"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    alternatives: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    alternatives += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A fresh self-signed certificate for 127.0.0.1 as <name>.pem and <name>.key."""
    cert_pem, key_pem = self_signed()
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    key_path.chmod(0o600)
    return cert_path, key_path


def server_context(directory: Path, name: str) -> tuple[ssl.SSLContext, Path]:
    """A server TLS context on a fresh self-signed certificate, and that certificate's path."""
    cert_path, key_path = write_self_signed(directory, name)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context, cert_path
