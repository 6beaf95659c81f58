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


@settings(max_examples=400)
@given(st.lists(segment, max_size=6), st.sampled_from(["GET", "PUT"]))
def test_direct_match_is_the_full_scans_match_or_nothing(segments: list[str], method: str) -> None:
    """A direct match is always the route Starlette would run; when a PARTIAL (405) route comes
    first the direct path declines, so Starlette's own router decides as before."""
    path = "/" + "/".join(segments)
    router = IndexedRouter(routes=_routes())
    scope = {"type": "http", "path": path, "method": method, "root_path": ""}
    for _ in range(2):  # the second lookup is the remembered one
        found = router.direct_match(scope)
        full_scan = _full_scan(Router(routes=_routes()).routes, scope)
        if found is None:
            assert full_scan is None or full_scan[0] == "partial-first"
        else:
            assert full_scan == ("full", found[0].path, found[1]["path_params"])


def _full_scan(routes: list, scope: dict) -> tuple | None:
    for route in routes:
        match, child = route.matches(scope)
        if match is Match.FULL:
            return ("full", route.path, child["path_params"])
        if match is Match.PARTIAL:
            return ("partial-first",)
    return None


def test_direct_match_path_params_are_per_request() -> None:
    router = IndexedRouter(routes=_routes())
    scope = {"type": "http", "path": "/v1/kv/a/b", "method": "PUT", "root_path": ""}
    first = router.direct_match(scope)
    assert first is not None and first[1]["path_params"] == {"key": "a/b"}
    first[1]["path_params"]["key"] = "changed by a handler"
    again = router.direct_match(scope)
    assert again is not None and again[1]["path_params"] == {"key": "a/b"}


def test_direct_match_sees_routes_added_later() -> None:
    router = IndexedRouter(routes=_routes()[:2])
    scope = {"type": "http", "path": "/v1/status/leader", "method": "GET", "root_path": ""}
    assert router.direct_match(scope) is None
    router.routes.extend(_routes()[2:])
    found = router.direct_match(scope)
    assert found is not None and found[0].path == "/v1/status/leader"


def test_direct_app_calls_handlers_and_falls_back_to_starlette() -> None:
    """Through a real ASGI client: the handler's answer for matches, Starlette's 404/405 otherwise,
    and an HTTPException from a handler answered by the app's handler for its status."""
    import httpx
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import PlainTextResponse

    from lictor.routing import DirectApp

    async def echo(request):
        return PlainTextResponse(f"{request.method} {request.path_params.get('key', '')} {request.url.path}")

    async def teapot(request):
        raise HTTPException(418, "short and stout")

    async def gone(request):
        raise HTTPException(410, "gone")

    async def not_found(request, exc):
        return PlainTextResponse("404 page not found", status_code=404)

    async def handled_gone(request, exc):
        return PlainTextResponse("handled: gone", status_code=410)

    handlers = {404: not_found, 405: not_found, 410: handled_gone}
    app = Starlette(exception_handlers=handlers)
    app.router = IndexedRouter(routes=[Route("/v1/kv/{key:path}", echo, methods=["GET", "PUT"]),
                                       Route("/v1/teapot", teapot), Route("/v1/gone", gone)])
    direct = DirectApp(app)

    async def run() -> list[tuple[int, str]]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=direct), base_url="http://t") as client:
            out = []
            for method, path in [("GET", "/v1/kv/a/b"), ("PUT", "/v1/kv/x"), ("GET", "/nowhere"),
                                 ("DELETE", "/v1/kv/x"), ("GET", "/v1/teapot"), ("GET", "/v1/gone")]:
                resp = await client.request(method, path)
                out.append((resp.status_code, resp.text))
            return out

    import asyncio

    assert asyncio.run(run()) == [
        (200, "GET a/b /v1/kv/a/b"), (200, "PUT x /v1/kv/x"), (404, "404 page not found"),
        (404, "404 page not found"), (418, "short and stout"), (410, "handled: gone"),
    ]
