"""Provisioning: a project CA, certificates for the coordinator and each site, revocation.

Mutual TLS is how the coordinator knows who is on the other end: a site's name is the common
name of the certificate the project CA issued it, so a site can only ever join (and submit
updates) as itself. Revoking a site appends its certificate's serial number to a plain text
file the coordinator rereads on every connection, so no restart is needed.

Layout of a project directory (the CA key never needs to leave the machine that provisions):

    ca.pem  ca.key                  the project CA (ca.key: mode 600)
    coordinator.pem  coordinator.key
    sites/NAME.pem  sites/NAME.key  one pair per site; give each site only its own pair + ca.pem
    revoked.txt                     serial numbers (hex), one a line; '#' starts a comment
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsky.errors import FedskyError

COORDINATOR = "coordinator"  # the coordinator certificate's common name; no site may use it
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_CA_DAYS = 3650
_LEAF_DAYS = 825  # what browsers accept for a leaf; sites are re-issued, not renewed in place


@dataclass(frozen=True)
class TlsFiles:
    """One end's PEM files: the CA it trusts, and its own certificate and key.

    On the coordinator, `revoked` names the revocation list (optional).
    """

    ca: str
    cert: str
    key: str
    revoked: str | None = None


@dataclass(frozen=True)
class Peer:
    """Who a verified client certificate says the peer is."""

    name: str  # the certificate's common name: the site's name
    serial: int
    client_auth: bool  # issued for a site (clientAuth), not for the coordinator


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write a private key readable by its owner only (created 600, never world-readable)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def init_ca(directory: Path, project: str = "fedsky") -> Path:
    """Create a project CA in `directory`; refuses to overwrite one (that would orphan every
    certificate already issued). Returns the CA certificate's path."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "ca.pem").exists() or (directory / "ca.key").exists():
        raise FedskyError(f"{directory} already holds a CA (ca.pem/ca.key); use another directory")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{project} project CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(directory / "ca.key", key)
    _write_cert(directory / "ca.pem", cert)
    (directory / "revoked.txt").touch()
    return directory / "ca.pem"


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    except OSError as err:
        raise FedskyError(f"no project CA in {directory} ({err.strerror}); "
                          f"run `fedsky certs init {directory}` first") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedskyError(f"{directory / 'ca.key'} is not a key fedsky made")
    return cert, key


def _issue(directory: Path, name: str, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier,
           stem: Path) -> Path:
    ca_cert, ca_key = _load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=_LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    stem.parent.mkdir(parents=True, exist_ok=True)
    _write_key(stem.with_suffix(".key"), key)
    _write_cert(stem.with_suffix(".pem"), builder.sign(ca_key, hashes.SHA256()))
    return stem.with_suffix(".pem")


def check_site_name(name: str) -> None:
    if not _SITE_NAME.match(name) or name == COORDINATOR:
        raise FedskyError(f"site name {name!r}: use letters, digits, '.', '_', '-' (at most 63) "
                          f"and not {COORDINATOR!r}")


def issue_site(directory: Path, name: str) -> Path:
    """A client certificate whose common name is the site's name (sites/NAME.pem and .key)."""
    check_site_name(name)
    return _issue(directory, name, [x509.DNSName(name)], ExtendedKeyUsageOID.CLIENT_AUTH,
                  directory / "sites" / name)


def issue_coordinator(directory: Path, hosts: Sequence[str]) -> Path:
    """The coordinator's server certificate, valid for each host name or IP address in `hosts`
    (what sites will dial). localhost and 127.0.0.1 are always included."""
    sans: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    return _issue(directory, COORDINATOR, sans, ExtendedKeyUsageOID.SERVER_AUTH,
                  directory / COORDINATOR)


def revoke(directory: Path, name: str) -> int:
    """Add site `name`'s certificate (sites/NAME.pem) to revoked.txt; returns its serial."""
    try:
        cert = x509.load_pem_x509_certificate((directory / "sites" / f"{name}.pem").read_bytes())
    except OSError as err:
        raise FedskyError(f"no certificate for site {name!r} in {directory}: {err.strerror}") from None
    with open(directory / "revoked.txt", "a") as f:
        f.write(f"{cert.serial_number:x}  # {name}, revoked {_now():%Y-%m-%d}\n")
    return cert.serial_number


def read_revoked(path: str | None) -> set[int]:
    """The serial numbers in a revocation list; a missing file is an error, not an empty list
    (a typo must not silently readmit a revoked site)."""
    if path is None:
        return set()
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise FedskyError(f"cannot read revocation list {path}: {err.strerror}") from None
    serials = set()
    for n, line in enumerate(text.splitlines(), 1):
        word = line.split("#", 1)[0].strip()
        if word:
            try:
                serials.add(int(word, 16))
            except ValueError:
                raise FedskyError(f"{path}:{n}: {word!r} is not a hex serial number") from None
    return serials


def peer_of(pem: bytes) -> Peer:
    """Read the identity out of a client certificate the TLS layer has already verified."""
    cert = x509.load_pem_x509_certificate(pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        client_auth = ExtendedKeyUsageOID.CLIENT_AUTH in usage
    except x509.ExtensionNotFound:
        client_auth = False
    return Peer(str(names[0].value) if names else "", cert.serial_number, client_auth)


def throwaway_pki(directory: Path, sites: Sequence[str], host: str) -> tuple[TlsFiles,
                                                                             dict[str, TlsFiles]]:
    """A CA, coordinator and site certificates for a run on this machine (`fedsky run
    --transport grpc`), so local runs use mutual TLS as deployments do. Reused if present."""
    if not (directory / "ca.pem").exists():
        init_ca(directory, "fedsky throwaway")
        issue_coordinator(directory, [host])
    for site in sites:
        if not (directory / "sites" / f"{site}.pem").exists():
            issue_site(directory, site)
    ca = str(directory / "ca.pem")
    server = TlsFiles(ca, str(directory / "coordinator.pem"), str(directory / "coordinator.key"),
                      str(directory / "revoked.txt"))
    return server, {s: TlsFiles(ca, str(directory / "sites" / f"{s}.pem"),
                                str(directory / "sites" / f"{s}.key")) for s in sites}
