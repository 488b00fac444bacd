"""Mutual TLS pinned to mycoSwarm ids: the contexts both ends use, and the peer's id.

Every identity is a self-signed certificate (`myco.identity`), so there is no CA.  The two ends
check each other differently, because Python's `ssl` has no verify callback:

- A server (a node agent) requires a client certificate and trusts exactly the certificates it
  was paired with: each is loaded as a trust anchor (`trust`: exactly one, or a second one
  smuggled behind it would be trusted too), so OpenSSL refuses anyone else in the handshake.
- A client (the gateway, a head node) knows only the id it expects: it skips chain verification
  and checks the fingerprint of the presented certificate against that id (`check_peer`) before
  it sends a byte.  No hostname is involved: an id names a key, not an address.
"""

from __future__ import annotations

import base64
import re
import ssl
from collections.abc import Iterable

from myco.identity import Identity, id_of

_PEM = re.compile(r"-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]+)-----END CERTIFICATE-----")


class IdentityMismatch(ssl.SSLError):
    """The peer presented a certificate whose id is not the one pinned for it."""


def server_context(identity: Identity, trusted_pems: Iterable[str]) -> ssl.SSLContext:
    """Serve as `identity`; accept only clients presenting one of `trusted_pems`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(identity.cert_path, identity.key_path)
    context.verify_mode = ssl.CERT_REQUIRED
    for pem in trusted_pems:
        trust(context, pem)
    return context


def trust(context: ssl.SSLContext, pem: str) -> None:
    """Add the one certificate `pem` holds to `context`'s trust anchors (ValueError otherwise)."""
    context.load_verify_locations(cadata=single_certificate(pem))


def client_context(identity: Identity) -> ssl.SSLContext:
    """Connect as `identity`; the server is checked by `check_peer`, not by a CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # TLS 1.2: the server refuses an unknown client certificate inside the handshake, so the
    # client knows before it sends anything (gateway/pool.py).  ECDHE + AEAD suites only.
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(identity.cert_path, identity.key_path)
    return context


def single_certificate(pem: str) -> str:
    """`pem` re-encoded; ValueError unless it is one PEM certificate and nothing else."""
    found = _PEM.fullmatch(pem.strip())
    if found is None:
        raise ValueError(f"expected exactly one PEM certificate and nothing else, found "
                         f"{pem.count('-----BEGIN ')} PEM block(s)")
    return ssl.DER_cert_to_PEM_cert(base64.b64decode("".join(found[1].split()), validate=True))


def certificate_id(pem: str) -> str:
    """The id of a PEM certificate; ValueError unless `pem` is exactly one."""
    return id_of(ssl.PEM_cert_to_DER_cert(single_certificate(pem)))


def peer_id(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The id of the certificate the other end presented (None: it presented none)."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return id_of(der) if der else None


def check_peer(ssl_object: ssl.SSLObject | ssl.SSLSocket | None, pinned: str) -> str:
    """The peer's id; `IdentityMismatch` unless it is `pinned`."""
    if (found := peer_id(ssl_object)) is None:
        raise IdentityMismatch("the peer presented no certificate")
    if found != pinned:
        raise IdentityMismatch(f"identity mismatch: expected {pinned}, the peer is {found}")
    return found
