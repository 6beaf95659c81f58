"""Connect sidecar proxy: mTLS inbound with intentions, load-balanced mTLS upstreams.

Start one next to a service registered with `Connect.SidecarService`:
`python -m lictor.agent.proxy -sidecar-for web -http-addr 127.0.0.1:8500`.
"""

from __future__ import annotations

from lictor.agent.proxy.balancer import Balancer, Endpoint
from lictor.agent.proxy.cli import main
from lictor.agent.proxy.config import ProxySpec, UpstreamSpec, parse_registration
from lictor.agent.proxy.proxy import ProxyError, SidecarProxy, run_proxy

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
