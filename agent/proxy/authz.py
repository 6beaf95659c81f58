"""Intention enforcement for one destination, over a locally cached intention list (pure).

The list is what `/v1/connect/intentions/match?by=destination&name=<dest>` returns; the decisions are
registry/intentions' `check_l4` and `check_request`. L4 decisions are memoised per source until the
list changes, because a connection storm from one caller asks the same question over and over.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lictor.errors import BadRequest
from lictor.registry.intentions import (
    DEFAULT_REASON,
    Decision,
    check_l4,
    check_request,
    find_intention,
    spiffe_service,
)

__all__ = ["Authorizer", "source_of"]


def source_of(uri: str) -> str | None:
    """`spiffe://td/ns/N/dc/D/svc/S` → `N/S`; None when it is not a service identity."""
    try:
        _td, ns, _dc, svc = spiffe_service(uri)
    except BadRequest:
        return None
    return f"{ns}/{svc}"


class Authorizer:
    """Decides whether `source` (`ns/name`) may reach `destination`."""

    def __init__(self, destination: str, default_allow: bool = True,
                 intentions: Sequence[Mapping[str, Any]] = ()) -> None:
        self.destination = destination
        self.default_allow = default_allow
        self.intentions: list[Mapping[str, Any]] = list(intentions)
        self._l4: dict[str, Decision] = {}
        self.generation = 0

    def replace(self, intentions: Sequence[Mapping[str, Any]], default_allow: bool | None = None) -> None:
        self.intentions = list(intentions)
        if default_allow is not None:
            self.default_allow = default_allow
        self._l4.clear()
        self.generation += 1

    def l4(self, source: str) -> Decision:
        hit = self._l4.get(source)
        if hit is None:
            if len(self._l4) > 4096:  # bounded: sources are services, but be safe
                self._l4.clear()
            hit = self._l4[source] = check_l4(self.intentions, source, self.destination, self.default_allow)
        return hit

    def request(self, source: str, method: str, path: str, headers: Mapping[str, str]) -> Decision:
        return check_request(self.intentions, source, self.destination, method, path, headers, self.default_allow)

    def connection_allowed(self, source: str, l7: bool) -> Decision:
        """May an already-open connection from `source` stay open? For an L4 listener this is the L4
        decision. An L7 listener judges every request, so it only drops a connection whose matching
        intention is an L4 deny (or, with nothing matching, a default deny)."""
        if not l7:
            return self.l4(source)
        ixn = find_intention(self.intentions, source, self.destination)
        if ixn is None:
            return Decision(self.default_allow, DEFAULT_REASON, None)
        if ixn.get("Permissions"):
            return Decision(True, "L7 intention: judged per request", dict(ixn))
        return self.l4(source)
