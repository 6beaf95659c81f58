"""Load balancing and passive outlier detection for one upstream (pure: clock and rng are arguments).

Theory of operation: the instance set comes from `/v1/health/connect/<dest>?passing` and is replaced
whole by `update()`; per-instance bookkeeping (active connections, consecutive connect failures,
ejection deadline) survives updates for instances that stay. `pick()` never returns an ejected
instance unless every instance is ejected (then ejection is ignored, as Envoy's
max_ejection_percent would: sending somewhere beats refusing everything). A connect failure bumps the
failure streak; `max_failures` in a row eject the instance for `ejection_time` seconds; a success
resets the streak.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_EJECTION_TIME",
    "DEFAULT_MAX_FAILURES",
    "LB_POLICIES",
    "Balancer",
    "Endpoint",
    "EndpointState",
]

DEFAULT_MAX_FAILURES = 5
DEFAULT_EJECTION_TIME = 30.0
LB_POLICIES = ("round_robin", "least_request", "random")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One sidecar of the destination: where to dial it and (for logs) which instance it is."""

    host: str
    port: int
    service_id: str = ""
    node: str = ""

    @property
    def key(self) -> tuple[str, int]:
        return (self.host, self.port)


@dataclass(slots=True)
class EndpointState:
    endpoint: Endpoint
    active: int = 0
    failures: int = 0
    ejected_until: float = 0.0
    ejections: int = 0
    total: int = field(default=0)


class Balancer:
    """Picks an endpoint per new connection.

    >>> b = Balancer("round_robin")
    >>> b.update([Endpoint("127.0.0.1", 21000), Endpoint("127.0.0.1", 21001)])
    >>> b.pick(now=0.0).port, b.pick(now=0.0).port
    (21000, 21001)
    """

    def __init__(self, policy: str = "round_robin", *, max_failures: int = DEFAULT_MAX_FAILURES,
                 ejection_time: float = DEFAULT_EJECTION_TIME, rng: random.Random | None = None) -> None:
        self.policy = policy if policy in LB_POLICIES else "round_robin"
        self.max_failures = max(1, max_failures)
        self.ejection_time = ejection_time
        self.rng = rng or random.Random()
        self.states: dict[tuple[str, int], EndpointState] = {}
        self._order: list[EndpointState] = []
        self._next = 0

    def update(self, endpoints: Iterable[Endpoint]) -> None:
        fresh: dict[tuple[str, int], EndpointState] = {}
        for ep in endpoints:
            old = self.states.get(ep.key)
            if old is not None:
                old.endpoint = ep
                fresh[ep.key] = old
            else:
                fresh[ep.key] = EndpointState(ep)
        self.states = fresh
        self._order = sorted(fresh.values(), key=lambda s: s.endpoint.key)

    def configure(self, policy: str, max_failures: int, ejection_time: float) -> None:
        self.policy = policy if policy in LB_POLICIES else "round_robin"
        self.max_failures = max(1, max_failures)
        self.ejection_time = ejection_time

    def available(self, now: float, exclude: set[tuple[str, int]] | frozenset[tuple[str, int]] = frozenset()
                  ) -> list[EndpointState]:
        cands = [s for s in self._order if s.endpoint.key not in exclude]
        healthy = [s for s in cands if s.ejected_until <= now]
        return healthy or cands

    def pick(self, now: float, exclude: set[tuple[str, int]] | frozenset[tuple[str, int]] = frozenset()
             ) -> Endpoint | None:
        cands = self.available(now, exclude)
        if not cands:
            return None
        if self.policy == "random":
            chosen = cands[self.rng.randrange(len(cands))]
        elif self.policy == "least_request":
            # Power of two choices (Envoy's default ChoiceCount=2): cheap and avoids herding.
            if len(cands) == 1:
                chosen = cands[0]
            else:
                a, b = self.rng.sample(cands, 2)
                chosen = a if a.active <= b.active else b
        else:
            chosen = cands[self._next % len(cands)]
            self._next = (self._next + 1) % (1 << 30)
        return chosen.endpoint

    def _state(self, ep: Endpoint) -> EndpointState | None:
        return self.states.get(ep.key)

    def connected(self, ep: Endpoint) -> None:
        st = self._state(ep)
        if st is not None:
            st.failures = 0
            st.active += 1
            st.total += 1

    def released(self, ep: Endpoint) -> None:
        st = self._state(ep)
        if st is not None and st.active > 0:
            st.active -= 1

    def failed(self, ep: Endpoint, now: float) -> bool:
        """Record a connect failure; True when this failure ejected the endpoint."""
        st = self._state(ep)
        if st is None:
            return False
        st.failures += 1
        if st.failures >= self.max_failures and st.ejected_until <= now:
            st.ejected_until = now + self.ejection_time
            st.ejections += 1
            st.failures = 0
            return True
        return False

    def snapshot(self, now: float) -> list[dict[str, object]]:
        return [
            {"Address": s.endpoint.host, "Port": s.endpoint.port, "ServiceID": s.endpoint.service_id,
             "Node": s.endpoint.node, "Active": s.active, "ConsecutiveFailures": s.failures,
             "Ejected": s.ejected_until > now, "Ejections": s.ejections, "Connections": s.total}
            for s in self._order
        ]
