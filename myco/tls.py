"""Mutual TLS pinned to mycoSwarm ids: the contexts both ends use, and the peer's id.

Every identity is a self-signed certificate (`myco.identity`), so there is no CA.  The two ends
check each other differently, because Python's `ssl` has no verify callback:

- A server (a node agent) requires a client certificate and trusts exactly the certificates it
  was paired with: each is loaded as a trust anchor, so OpenSSL itself refuses anyone else
  during the handshake.
- A client (the gateway, a head node) knows only the id it expects.  It skips chain
  verification and compares the fingerprint of the certificate the server presented with the
  pinned id (`check_peer`) before it sends a single byte.  No hostname is involved: an id names
  a key, not an address.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable

from myco.identity import Identity, id_of


class IdentityMismatch(ssl.SSLError):
    """The peer presented a certificate whose id is not the one pinned for it."""


def server_context(identity: Identity, trusted_pems: Iterable[str]) -> ssl.SSLContext:
    """Serve as `identity`; accept only clients presenting one of `trusted_pems`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(identity.cert_path, identity.key_path)
    context.verify_mode = ssl.CERT_REQUIRED
    pems = "".join(trusted_pems)
    if pems:
        context.load_verify_locations(cadata=pems)
    return context


def client_context(identity: Identity) -> ssl.SSLContext:
    """Connect as `identity`; the server is checked by `check_peer`, not by a CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # TLS 1.2: the server refuses an unknown client certificate inside the handshake, so the
    # client knows before it sends anything (gateway/upstream.py).  ECDHE + AEAD suites only.
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(identity.cert_path, identity.key_path)
    return context


def certificate_id(pem: str) -> str:
    """The id of a PEM certificate; ValueError if it is not one."""
    return id_of(ssl.PEM_cert_to_DER_cert(pem.strip()))


def peer_id(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The id of the certificate the other end presented (None: it presented none)."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return id_of(der) if der else None


def check_peer(ssl_object: ssl.SSLObject | ssl.SSLSocket | None, pinned: str | None) -> str:
    """The peer's id; `IdentityMismatch` unless it is `pinned` (None pins nothing)."""
    found = peer_id(ssl_object)
    if found is None:
        raise IdentityMismatch("the peer presented no certificate")
    if pinned is not None and found != pinned:
        raise IdentityMismatch(f"identity mismatch: expected {pinned}, the peer is {found}")
    return found
