"""IndexedRouter picks the same route Starlette's full scan picks, for any path (no sockets)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.routing import Match, Route, Router

from lictor.routing import IndexedRouter, _key


async def _endpoint(request):  # pragma: no cover - never called: only matching is tested
    raise AssertionError


PATHS = [
    "/v1/kv/{key:path}", "/v1/agent/service/register", "/v1/agent/service/{id}", "/v1/agent/self",
    "/v1/catalog/service/{name}", "/v1/catalog/services", "/v1/health/service/{name}", "/v1/status/leader",
    "/v1/{anything:path}", "/{x}/status/peers", "/v1/agent/check/pass/{id:path}",
]


def _routes() -> list[Route]:
    return [Route(p, _endpoint, methods=["GET"] if i % 2 else ["PUT"]) for i, p in enumerate(PATHS)]


def _first_match(routes: list, path: str, method: str) -> tuple[str | None, str | None]:
    scope = {"type": "http", "path": path, "method": method, "root_path": ""}
    full = partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            full = full or route.path
        elif match is Match.PARTIAL:
            partial = partial or route.path
    return full, partial


segment = st.sampled_from(["v1", "kv", "agent", "service", "register", "status", "leader", "catalog", "x", "",
                           "health", "check", "pass", "a%2Fb", "peers"])


@settings(max_examples=400)
@given(st.lists(segment, max_size=6), st.sampled_from(["GET", "PUT"]))
def test_candidates_keep_the_first_match(segments: list[str], method: str) -> None:
    path = "/" + "/".join(segments)
    router = IndexedRouter(routes=_routes())
    assert _first_match(router._routes_for(path), path, method) == _first_match(Router(routes=_routes()).routes,
                                                                                   path, method)


def test_routes_added_later_are_seen() -> None:
    router = IndexedRouter(routes=_routes()[:2])
    assert _first_match(router._routes_for("/v1/status/leader"), "/v1/status/leader", "GET") == (None, None)
    router.routes.extend(_routes()[2:])
    assert _first_match(router._routes_for("/v1/status/leader"), "/v1/status/leader", "GET")[0] is not None


def test_keys_are_the_first_segments() -> None:
    assert _key("/v1/kv/a/b/c") == "/v1/kv/"
    assert _key("/v1/kv") == "/v1/kv"
    assert _key("/") == "/"
