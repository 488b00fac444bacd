"""The gateways a node agent serves: `gateways.toml` in its state directory.

A node answers only gateways it was paired with.  Pairing stores the gateway's certificate,
because the node's TLS server can only trust a self-signed certificate it holds (see
myco/tls.py); the table key is the gateway's id, which is checked against the certificate on
every load, so an edited file cannot smuggle another key in, and an entry must hold exactly
one certificate (a second one behind it would be trusted too):

    # Gateways this node serves.  `myco node allow GATEWAY_ID` adds one.
    [AAAAAAA-...-AAAAAAA]
    name = "gateway on pi"
    certificate = '''
    -----BEGIN CERTIFICATE-----
    ...'''

A malformed file, or a certificate whose fingerprint is not its id, raises `PairingError` (a
`ConfigError`) naming the file and the reason; start-up stops on it.  `add` edits the file with
tomlkit: what the person wrote there stays as it was.  While the node runs, `follow` trusts
gateways paired since (a removal takes effect at the next start: OpenSSL's trust store only grows).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import tomllib
from pathlib import Path

import tomlkit

from myco.errors import ConfigError
from myco.identity import parse_id
from myco.tls import certificate_id, single_certificate, trust

log = logging.getLogger("myco.node.pairing")
FILE = "gateways.toml"
_HEADER = "# Gateways this node serves.  `myco node allow GATEWAY_ID` adds one.\n"


class PairingError(ConfigError):
    pass


def load(state_dir: Path) -> dict[str, str]:
    """Paired gateway id -> certificate PEM ({} when nothing is paired yet)."""
    path = state_dir / FILE
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PairingError(str(path), str(exc)) from None
    paired: dict[str, str] = {}
    for key, entry in doc.items():
        pem = entry.get("certificate") if isinstance(entry, dict) else None
        if not isinstance(pem, str):
            raise PairingError(str(path), f"[{key!r}] needs certificate = '''PEM'''")
        try:
            expected, found = parse_id(key), certificate_id(pem)
        except ValueError as exc:
            raise PairingError(str(path), f"[{key!r}]: {exc}") from None
        if found != expected:
            raise PairingError(str(path), f"[{key!r}]: the certificate's id is {found}")
        paired[expected] = single_certificate(pem)
    return paired


def add(state_dir: Path, gateway_id: str, pem: str, name: str = "") -> bool:
    """Pair a gateway (False if it already was); ValueError unless `pem` is exactly one
    certificate, `gateway_id`'s.  The file's other lines are kept as they were."""
    expected, pem = parse_id(gateway_id), single_certificate(pem)
    if (found := certificate_id(pem)) != expected:
        raise ValueError(f"the certificate offered is {found}, not {expected}")
    if expected in load(state_dir):
        return False
    path = state_dir / FILE
    state_dir.mkdir(parents=True, exist_ok=True)
    doc = tomlkit.parse(path.read_text(encoding="utf-8") if path.exists() else _HEADER)
    doc[expected] = {"name": name, "certificate": tomlkit.string(
        pem.strip() + "\n", literal=True, multiline=True)}
    path.write_text(tomlkit.dumps(doc), encoding="utf-8")
    return True


async def follow(state_dir: Path, context: ssl.SSLContext, known: set[str], *,
                 interval: float = 1.0) -> None:
    """Every `interval` seconds: trust gateways paired since `known` was read (runs until
    cancelled; a bad file is logged and the node keeps what it trusts)."""
    path, seen = state_dir / FILE, None
    while True:
        await asyncio.sleep(interval)
        try:
            if (stamp := path.stat().st_mtime_ns) == seen:
                continue
            seen = stamp
            paired = load(state_dir)
        except OSError:
            continue
        except PairingError as exc:
            log.warning("not reloaded: %s", exc)
            continue
        for gateway_id, pem in paired.items():
            if gateway_id not in known:
                trust(context, pem)
                known.add(gateway_id)
                log.info("now serving gateway %s", gateway_id)
