"""TLS material for the coordinator and authentication keys for sites, made with `cryptography`.

The coordinator holds a private CA; its server certificate names every host name and IP the
sites will dial. Each site makes an EC P-384 key pair (OpenSSH format, as Flower's SuperNode
authentication expects); only the public half leaves the site, and the coordinator registers it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class ServerCertificates:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class SiteKeyPair:
    private_key: Path
    public_key: Path


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def make_server_certificates(
    out: str | os.PathLike,
    hosts: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    days: int = 825,
    organisation: str = "fedspine federation",
) -> ServerCertificates:
    """A CA and a server certificate whose SANs name ``hosts`` (DNS names or IP addresses).

    The loopback names are always added: the coordinator's own checks, its `flwr` connection and
    the front's link to the SuperLink dial this machine on loopback, whatever public name the
    operator certifies (a loopback name cannot be reached from another machine).
    """
    out = Path(out)
    hosts = [*hosts, *(h for h in LOOPBACK_HOSTS if h not in hosts)]
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{organisation} CA"),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    if not sans:
        raise ValueError("the server certificate needs at least one host name or IP address")
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(hosts[0]))]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )

    paths = ServerCertificates(
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        server_cert=out / "server.pem",
        server_key=out / "server.key",
    )
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(paths.ca_key, _private_pem(ca_key), 0o600)
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(paths.server_key, _private_pem(server_key), 0o600)
    return paths


def make_site_keypair(private_key_path: str | os.PathLike, comment: str = "") -> SiteKeyPair:
    """An EC P-384 key pair in OpenSSH format; the public key is written beside it as ``.pub``."""
    private_key_path = Path(private_key_path)
    if private_key_path.exists():
        raise FileExistsError(f"{private_key_path} exists; a site key is never overwritten")
    private_key_path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    if comment:
        public = public + b" " + comment.encode()
    public_path = private_key_path.with_name(private_key_path.name + ".pub")
    _write(private_key_path, private, 0o600)
    _write(public_path, public + b"\n", 0o644)
    return SiteKeyPair(private_key=private_key_path, public_key=public_path)


def read_public_key(path: str | os.PathLike) -> str:
    """Validate an OpenSSH EC P-384 public key file and return its one line."""
    path = Path(path)
    try:
        line = path.read_text().strip()
        key = serialization.load_ssh_public_key(line.encode())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not an OpenSSH public key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise ValueError(f"{path}: site keys must be EC P-384 (made by `fedspine client keygen`)")
    return line


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


EXPIRY_WARNING_DAYS = 30


@dataclass(frozen=True)
class CertificateExpiry:
    """When a certificate stops being valid, and whether an operator must act now."""

    path: Path
    subject: str
    not_after: dt.datetime
    days_left: float

    @property
    def expired(self) -> bool:
        return self.days_left <= 0

    @property
    def warning(self) -> str | None:
        """A line for the operator once fewer than :data:`EXPIRY_WARNING_DAYS` days are left."""
        if self.expired:
            return (
                f"{self.path.name} expired on {self.not_after:%Y-%m-%d}: sites cannot connect; "
                "make a new one with `fedspine server certs`"
            )
        if self.days_left < EXPIRY_WARNING_DAYS:
            return (
                f"{self.path.name} expires on {self.not_after:%Y-%m-%d} "
                f"({self.days_left:.0f} days left): renew it with `fedspine server certs` and "
                "restart the server"
            )
        return None


def certificate_expiry(
    path: str | os.PathLike, now: dt.datetime | None = None
) -> CertificateExpiry:
    """Read a PEM certificate's expiry (``not_valid_after``) and the days left from ``now``."""
    path = Path(path)
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable PEM certificate ({err})") from None
    now = now or dt.datetime.now(dt.UTC)
    not_after = cert.not_valid_after_utc
    return CertificateExpiry(
        path=path,
        subject=cert.subject.rfc4514_string(),
        not_after=not_after,
        days_left=(not_after - now).total_seconds() / 86400,
    )
