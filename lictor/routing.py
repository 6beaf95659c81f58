"""Route dispatch that looks only at the routes a path could match.

Starlette's Router tries every route's regex in order; with Consul's ~150 endpoints that linear scan
was ~20 % of the CPU of a simple read. Routes are grouped by the literal start of their path (the
text before the first `{param}`), and a request only tries the routes whose literal start is
compatible with its first path segments, in their original order, so first-match semantics are
unchanged. Anything unmatched goes through Starlette's full scan (404s, 405s, slash redirects).

`DirectApp` calls a matched route's handler without Starlette's per-request layers (see there).
"""

from __future__ import annotations

import inspect
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse
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
        # (method, path) -> the route that fully matches it and its path params, or None
        self._matches: dict[tuple[str, str], tuple[Route, dict[str, Any]] | None] = {}

    def _routes_for(self, path: str) -> list[BaseRoute]:
        if self._indexed_count != len(self.routes):  # routes are appended while an agent starts
            self._candidates.clear()
            self._matches.clear()
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

    def direct_match(self, scope: Scope) -> tuple[Route, dict[str, Any]] | None:
        """The async function route that fully matches this request (first match wins), with its
        child scope; None when only Starlette's own handling will do (no match, 405, redirects).
        Remembered per (method, path): the hot reads repeat the same few paths."""
        key = (scope["method"], scope["path"])
        if self._indexed_count == len(self.routes) and key in self._matches:
            found = self._matches[key]
        else:
            found = None
            for route in self._routes_for(scope["path"]):
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    if isinstance(route, Route) and inspect.iscoroutinefunction(route.endpoint):
                        found = (route, child_scope)
                    break
                if match is Match.PARTIAL:
                    break  # a 405 (or a later full match after a partial one): Starlette decides
            if len(self._matches) >= MAX_CACHED_KEYS:
                self._matches.clear()
            self._matches[key] = found
        if found is None:
            return None
        route, child_scope = found
        return route, {**child_scope, "path_params": dict(child_scope.get("path_params", {}))}


class DirectApp:
    """A Starlette app whose matched routes are called directly.

    Per request Starlette adds its error and exception middlewares, the router, `request_response`
    and two exception-handling wrappers, each a coroutine frame and most a wrapped `send`: about a
    third of the CPU of a cached read. For a route the `IndexedRouter` matches fully, this builds the
    Request, awaits the handler and sends its response itself. Our handlers (`httpapi.guarded`)
    turn their own errors into responses; an `HTTPException` goes to the app's handler for its
    status, as Starlette's would. Everything else (404, 405, redirects) is the app's.
    """

    def __init__(self, app: Starlette) -> None:
        assert isinstance(app.router, IndexedRouter), "DirectApp needs the app's router to be an IndexedRouter"
        self.app = app
        self.router = app.router
        self.exception_handlers = app.exception_handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self.router.direct_match(scope) if scope["type"] == "http" and not scope.get("root_path") else None
        if found is None:
            await self.app(scope, receive, send)
            return
        route, child_scope = found
        scope["app"] = self.app
        scope["router"] = self.router
        scope["route"] = route
        scope.update(child_scope)
        request = Request(scope, receive, send)
        try:
            response = await route.endpoint(request)
        except HTTPException as exc:
            handler = self.exception_handlers.get(exc.status_code)
            if handler is not None:
                response = await handler(request, exc)
            else:  # Starlette's default for an HTTPException
                response = PlainTextResponse(exc.detail, status_code=exc.status_code, headers=exc.headers)
        await response(scope, receive, send)
