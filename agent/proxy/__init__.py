"""Connect sidecar proxy: mTLS inbound with intentions, load-balanced mTLS upstreams.

Start one next to a service registered with `Connect.SidecarService`:
`python -m lictor.agent.proxy -sidecar-for web -http-addr 127.0.0.1:8500`.

The names below load lazily (PEP 562): `lictor.gateway.proxy` imports `lictor.agent.proxy.tls`, and
the sidecar's http upstreams import the gateway's connection pool, so importing this package must
not pull in the whole proxy.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Balancer",
    "Endpoint",
    "ProxyError",
    "ProxySpec",
    "SidecarProxy",
    "UpstreamSpec",
    "main",
    "parse_registration",
    "run_proxy",
]

_WHERE = {
    "Balancer": "balancer", "Endpoint": "balancer", "main": "cli", "ProxySpec": "config", "UpstreamSpec": "config",
    "parse_registration": "config", "ProxyError": "proxy", "SidecarProxy": "proxy", "run_proxy": "proxy",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
