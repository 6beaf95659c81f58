"""Route dispatch that looks only at the routes a path could match.

Starlette's Router tries every route's regex in order; with Consul's ~150 endpoints that linear scan
was ~20 % of the CPU of a simple read. Routes are grouped by the literal start of their path (the
text before the first `{param}`), and a request only tries the routes whose literal start is
compatible with its first path segments, in their original order, so first-match semantics are
unchanged. Anything unmatched goes through Starlette's full scan (404s, 405s, slash redirects).
"""

from __future__ import annotations

from typing import Any

from starlette.routing import BaseRoute, Match, Route, Router
from starlette.types import Receive, Scope, Send

MAX_CACHED_KEYS = 1024  # request paths choose the keys: keep the table bounded


def _literal_start(route: BaseRoute) -> str | None:
    """The text every path this route matches starts with; None when it can't be known."""
    if not isinstance(route, Route):
        return None
    return route.path.split("{", 1)[0]


def _key(path: str) -> str:
    """The first segments of a path, '/v1/kv/' for '/v1/kv/a/b': few distinct values in practice."""
    cut = -1
    for _ in range(3):
        cut = path.find("/", cut + 1)
        if cut == -1:
            return path
    return path[: cut + 1]


class IndexedRouter(Router):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._candidates: dict[str, list[BaseRoute]] = {}
        self._indexed_count = -1

    def _routes_for(self, path: str) -> list[BaseRoute]:
        if self._indexed_count != len(self.routes):  # routes are appended while an agent starts
            self._candidates.clear()
            self._indexed_count = len(self.routes)
        key = _key(path)
        found = self._candidates.get(key)
        if found is None:
            found = []
            for route in self.routes:
                start = _literal_start(route)
                if start is None or start.startswith(key) or key.startswith(start):
                    found.append(route)
            if len(self._candidates) >= MAX_CACHED_KEYS:
                self._candidates.clear()
            self._candidates[key] = found
        return found

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("root_path"):
            await super().app(scope, receive, send)
            return
        scope.setdefault("router", self)
        partial = None
        for route in self._routes_for(scope["path"]):
            match, child_scope = route.matches(scope)
            if match is Match.FULL:
                scope["route"] = route
                scope.update(child_scope)
                await route.handle(scope, receive, send)
                return
            if match is Match.PARTIAL and partial is None:
                partial, partial_scope = route, child_scope
        if partial is not None:  # the path matches but not the method: the route answers 405
            scope["route"] = partial
            scope.update(partial_scope)
            await partial.handle(scope, receive, send)
            return
        await super().app(scope, receive, send)
