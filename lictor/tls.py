"""TLS for an agent's own calls to the servers (issue #9): cluster hellos and joins, heartbeats to the
leader, and a client agent's anti-entropy and forwarding.

One policy for servers and client agents alike, Consul's flags:

- Whenever an outgoing call uses TLS, the server's chain is verified against `-ca-file` (or the system
  roots) and the agent presents `-client-cert`/`-client-key` (default `-cert-file`/`-key-file`), so
  peers running `-verify-incoming` accept it.
- `-verify-outgoing` makes TLS mandatory: a bare `host:port` in `-retry-join` means `https://`, and a
  server never falls back to a peer's plain HTTP address.
- `-verify-server-hostname` checks the server's certificate for `server.<datacenter>.<domain>` instead
  of the address dialled, so a certificate issued to a client agent cannot pose as a server.
"""

from __future__ import annotations

import os
import ssl
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from lictor.config import AgentConfig


def server_name(config: AgentConfig) -> str:
    """The name every server certificate carries under -verify-server-hostname (Consul's)."""
    return f"server.{config.datacenter}.{config.domain.rstrip('.')}"


def outgoing_context(config: AgentConfig) -> ssl.SSLContext:
    """Verifies the servers we call and presents our certificate to them. Raises OSError/ssl.SSLError."""
    context = ssl.create_default_context(cafile=config.ca_file or None)
    cert_file, key_file = config.client_cert or config.cert_file, config.client_key or config.key_file
    if cert_file and key_file:
        context.load_cert_chain(cert_file, key_file)
    return context


def ssl_env() -> bool:
    """LICTOR_HTTP_SSL / CONSUL_HTTP_SSL: a client agent's way of saying "my servers speak HTTPS"."""
    value = (os.environ.get("LICTOR_HTTP_SSL") or os.environ.get("CONSUL_HTTP_SSL") or "").lower()
    return value in ("1", "true", "yes")


def default_scheme(config: AgentConfig) -> str:
    """The scheme of a -retry-join address written without one."""
    return "https" if config.verify_outgoing or ssl_env() else "http"


def join_url(address: str, config: AgentConfig) -> str:
    """`host:port`, `http://host:port` or `https://host:port` -> a base URL without a trailing slash."""
    address = address.rstrip("/")
    return address if "://" in address else f"{default_scheme(config)}://{address}"


def outgoing_client(config: AgentConfig, **kwargs: Any) -> httpx.AsyncClient:
    """An httpx client for calls to servers, with the TLS policy above applied."""
    client = httpx.AsyncClient(verify=outgoing_context(config), **kwargs)
    apply_server_name(client, config)
    return client


def apply_server_name(client: httpx.AsyncClient, config: AgentConfig) -> None:
    """Under -verify-server-hostname, check every HTTPS server against server.<dc>.<domain>.

    httpcore takes the name to verify from the request's `sni_hostname` extension; a request hook sets
    it on every request, so callers need not remember to (plain http:// requests ignore it).
    """
    if not config.verify_server_hostname:
        return
    name = server_name(config)

    async def set_name(request: httpx.Request) -> None:
        if request.url.scheme == "https":
            request.extensions["sni_hostname"] = name

    client.event_hooks = {**client.event_hooks, "request": [*client.event_hooks.get("request", []), set_name]}
