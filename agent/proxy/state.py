"""What the listeners read per connection; the control plane swaps its fields whole."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from lictor.agent.proxy.authz import Authorizer
from lictor.agent.proxy.config import ProxySpec
from lictor.agent.proxy.observe import Observer
from lictor.agent.proxy.stats import Stats

__all__ = ["ProxyState"]


@dataclass
class ProxyState:
    spec: ProxySpec
    authz: Authorizer
    datacenter: str = "dc1"
    trust_domain: str = ""
    own_uri: str = ""
    l7: bool = False  # destination protocol is http/http2/grpc (service-defaults)
    server_ctx: ssl.SSLContext | None = None
    client_ctx: ssl.SSLContext | None = None
    stats: Stats = field(default_factory=Stats)
    obs: Observer | None = None  # traces / access logs; None when both are off
