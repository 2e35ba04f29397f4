"""The ACME cache directory: the account key and every certificate with its key.

The directory is 0700 and every file 0600, owned by the supervisor's user; files are
written to a temporary name in the same directory and renamed over the old one, so a
crash leaves either the old file or the new one, never half of one. Sandboxes see the
directory as an empty tmpfs (instances/supervisor/isolation.py hides it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically, mode 0600 from the first byte."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # born 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def self_signed(names: list[str], days: int = 365) -> tuple[bytes, bytes]:
    """(certificate, key) PEM: what a handshake gets while no real certificate exists."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tenement self-signed")])
    at = now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(at - timedelta(minutes=5))
        .not_valid_after(at + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem(key)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def new_key_pem() -> bytes:
    """A P-256 key (every CA and client takes it; faster handshakes than RSA)."""
    return _pem(ec.generate_private_key(ec.SECP256R1()))


@dataclass(frozen=True)
class StoredCert:
    """A certificate on disk: its files and what the leaf says."""

    cert_path: Path
    key_path: Path
    names: tuple[str, ...]
    issuer: str
    not_before: datetime
    not_after: datetime

    @property
    def lifetime(self) -> float:
        return (self.not_after - self.not_before).total_seconds()

    def renew_at(self) -> datetime:
        """When a third of the lifetime remains."""
        return self.not_after - (self.not_after - self.not_before) / 3

    def covers(self, name: str) -> bool:
        return any(matches(pattern, name) for pattern in self.names)


def matches(pattern: str, name: str) -> bool:
    """'*.notes.example.com' covers 'alice.notes.example.com', one label deep only."""
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == name


def describe(cert_pem: bytes, cert_path: Path, key_path: Path) -> StoredCert:
    leaf = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = leaf.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
        names = tuple(san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    issuer = leaf.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return StoredCert(
        cert_path=cert_path,
        key_path=key_path,
        names=names,
        issuer=str(issuer[0].value) if issuer else leaf.issuer.rfc4514_string(),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
    )


def file_stem(names: tuple[str, ...]) -> str:
    """A file name for a certificate's names: readable, and unique per set of names."""
    first = names[0].replace("*", "_wildcard")
    digest = hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:12]
    return f"{first}-{digest}"


class CertStore:
    """`cache_dir`: account.key, account.json, certs/NAME-HASH.{crt,key}."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.certs = root / "certs"

    def prepare(self) -> None:
        """Create the folders 0700, and tighten them if an operator loosened them."""
        for folder in (self.root, self.certs):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(folder, 0o700)

    # ---- the ACME account ----------------------------------------------------------

    def account_key(self) -> bytes:
        """The account key, created on first use and kept across restarts."""
        path = self.root / "account.key"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            pem = new_key_pem()
            write_private(path, pem)
            return pem

    def account(self, directory_url: str) -> str | None:
        """The account URL registered at this CA, if any."""
        try:
            data = json.loads((self.root / "account.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return data.get(directory_url)

    def save_account(self, directory_url: str, uri: str) -> None:
        path = self.root / "account.json"
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            data = {}
        data[directory_url] = uri
        write_private(path, json.dumps(data, indent=2).encode())

    # ---- certificates --------------------------------------------------------------

    def save(self, names: tuple[str, ...], fullchain_pem: bytes, key_pem: bytes) -> StoredCert:
        """Key first, then the chain: a chain on disk always has its key beside it."""
        stem = file_stem(names)
        key_path, cert_path = self.certs / f"{stem}.key", self.certs / f"{stem}.crt"
        write_private(key_path, key_pem)
        write_private(cert_path, fullchain_pem)
        return describe(fullchain_pem, cert_path, key_path)

    def load_all(self) -> list[StoredCert]:
        """Every certificate in the cache whose key is there too; unreadable ones skipped."""
        found = []
        for cert_path in sorted(self.certs.glob("*.crt")):
            key_path = cert_path.with_suffix(".key")
            if not key_path.exists():
                continue
            try:
                found.append(describe(cert_path.read_bytes(), cert_path, key_path))
            except (OSError, ValueError):
                continue
        return found


def now() -> datetime:
    return datetime.now(UTC)
