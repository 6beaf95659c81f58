"""SSLContext builders from a Connect leaf and the CA roots, and SPIFFE IDs from peer certificates.

Contexts are immutable once built: when the leaf or the roots change the proxy builds new ones and
swaps the reference, so new connections use the new material and open ones keep theirs.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["TLSMaterial", "client_context", "peer_uris", "server_context", "sni_for"]


@dataclass(frozen=True, slots=True)
class TLSMaterial:
    cert_pem: str  # leaf first, then any intermediates (cross-signed roots) the peer may need
    key_pem: str
    roots_pems: tuple[str, ...]
    trust_domain: str = ""


def _load_chain(ctx: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    # `load_cert_chain` only reads files: write both to a private dir, load, remove at once.
    tmpdir = tempfile.mkdtemp(prefix="lictor-proxy-")
    cert_path = os.path.join(tmpdir, "cert.pem")
    key_path = os.path.join(tmpdir, "key.pem")
    try:
        for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(data)
        ctx.load_cert_chain(cert_path, key_path)
    finally:
        for path in (cert_path, key_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        os.rmdir(tmpdir)


def _base(ctx: ssl.SSLContext, material: TLSMaterial) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata="\n".join(material.roots_pems))
    _load_chain(ctx, material.cert_pem, material.key_pem)
    return ctx


def server_context(material: TLSMaterial) -> ssl.SSLContext:
    """Inbound: TLS 1.3 only, client certificate required and chained to one of the roots."""
    ctx = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), material)
    ctx.num_tickets = 0  # our clients never resume; tickets would only cost a signature-free encrypt
    return ctx


def client_context(material: TLSMaterial) -> ssl.SSLContext:
    """Outbound: verify the chain against the roots; the identity (URI SAN) is checked by the caller,
    since Connect certificates carry a SPIFFE URI rather than a hostname."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    return _base(ctx, material)


def peer_uris(peercert: Mapping[str, Any] | None) -> list[str]:
    """URI SANs from `getpeercert()` (`subjectAltName` holds ('URI', value) pairs)."""
    if not peercert:
        return []
    sans: Iterable[tuple[str, str]] = peercert.get("subjectAltName", ())  # type: ignore[assignment]
    return [value for kind, value in sans if kind == "URI"]


def sni_for(service: str, dc: str, trust_domain: str, namespace: str = "default") -> str | None:
    """Consul's SNI for a service (`<svc>.<ns>.<dc>.internal.<trust-domain>`); None without a domain."""
    if not trust_domain:
        return None
    return f"{service}.{namespace}.{dc}.internal.{trust_domain}"
