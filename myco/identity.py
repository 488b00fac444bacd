"""Identities: a key pair and self-signed certificate per node or gateway, kept in its state
directory; the id is the certificate's fingerprint, in a form a person can read aloud.

The id follows Syncthing's device-id shape: SHA-256 of the certificate (DER), base32, with a
Luhn mod-32 check character after each 13 characters, shown as 8 groups of 7.  A mistyped id
fails `parse_id`; an id never depends on a name or an address, so announcing a listed name
with another certificate yields another id.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
from pathlib import Path

import msgspec

from myco.errors import ConfigError

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


class Identity(msgspec.Struct, frozen=True):
    id: str
    cert_path: str
    key_path: str
    certificate: str  # the certificate (public), as PEM, read once

    def pem(self) -> str:
        return self.certificate


def _luhn32(chunk: str) -> str:
    factor, total = 1, 0
    for char in chunk:
        addend = factor * _ALPHABET.index(char)
        factor = 1 if factor == 2 else 2
        total += addend // 32 + addend % 32
    return _ALPHABET[(32 - total % 32) % 32]


def id_of(cert_der: bytes) -> str:
    raw = base64.b32encode(hashlib.sha256(cert_der).digest()).decode().rstrip("=")
    checked = "".join(raw[i:i + 13] + _luhn32(raw[i:i + 13]) for i in range(0, 52, 13))
    return "-".join(checked[i:i + 7] for i in range(0, 56, 7))


def parse_id(text: str) -> str:
    """Normalise a typed id; raise ValueError if it is malformed or a check character fails."""
    flat = text.strip().upper().replace("-", "").replace(" ", "")
    if len(flat) != 56 or any(c not in _ALPHABET for c in flat):
        raise ValueError(f"{text!r} is not a mycoSwarm id (8 groups of 7 base32 characters)")
    for i in range(0, 56, 14):
        if _luhn32(flat[i:i + 13]) != flat[i + 13]:
            raise ValueError(f"{text!r}: check character {i // 14 + 1} does not match (typo?)")
    return "-".join(flat[i:i + 7] for i in range(0, 56, 7))


def load_or_create(state_dir: Path, common_name: str) -> Identity:
    """The identity kept in `state_dir`, created on first use (key file mode 0600);
    ConfigError naming the file if cert.pem or key.pem cannot be read or do not match."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_path, key_path = state_dir / "cert.pem", state_dir / "key.pem"
    if not cert_path.exists() or not key_path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=20 * 365))
                .sign(key, hashes.SHA256()))
        with os.fdopen(os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    where, what = cert_path, "a PEM certificate"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        where, what = key_path, f"the PEM private key of {cert_path.name}, with no passphrase"
        private = serialization.load_pem_private_key(key_path.read_bytes(), None)
        if private.public_key() != cert.public_key():
            raise ValueError(what)
    except (OSError, ValueError, TypeError) as exc:  # TypeError: a key with a passphrase
        reason = f"cannot read it: {exc.strerror}" if isinstance(exc, OSError) else f"not {what}"
        raise ConfigError(str(where), f"{reason} (move cert.pem and key.pem away for a new "
                          "identity, a new id: pair it again)") from None
    return Identity(id_of(cert.public_bytes(serialization.Encoding.DER)), str(cert_path),
                    str(key_path), cert.public_bytes(serialization.Encoding.PEM).decode("ascii"))
