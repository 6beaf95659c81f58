"""HTTP plumbing shared by server and client agents: Consul's params, headers, errors, blocking.

Handlers raise `APIError`s; `error_middleware` turns them (and anything unexpected) into Consul's
plain-text answers, so no handler builds an error response by hand.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from lictor import metrics
from lictor.durations import DurationError, parse_duration
from lictor.errors import APIError, BadRequest, PayloadTooLarge

log = logging.getLogger("lictor.http")

DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0
MAX_BODY = 4 * 1024 * 1024
TRUE_WORDS = {"1", "t", "T", "TRUE", "true", "True"}
FALSE_WORDS = {"0", "f", "F", "FALSE", "false", "False"}


def parse_bool(value: str, name: str) -> bool:
    """Go's strconv.ParseBool, plus Consul's rule that a bare `?name` means true."""
    if value == "" or value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise BadRequest(f"Invalid value for ?{name}: {value!r} is not a boolean")


def query_bool(request: Request, name: str) -> bool:
    if name not in request.query_params:
        return False
    return parse_bool(request.query_params[name], name)


def query_int(request: Request, name: str, default: int | None = None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"Invalid value for ?{name}: {raw!r} is not an integer") from None
    if value < 0:
        raise BadRequest(f"Invalid value for ?{name}: must not be negative")
    return value


def node_meta_filters(request: Request) -> list[tuple[str, str]]:
    filters = []
    for item in request.query_params.getlist("node-meta"):
        key, sep, value = item.partition(":")
        if not sep:
            raise BadRequest(f"Invalid node-meta filter {item!r}: expected key:value")
        filters.append((key, value))
    return filters


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """Read the body, refusing as soon as it passes `limit` instead of buffering all of it."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body too large: {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body too large: exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class QueryOptions:
    index: int
    wait: float
    consistent: bool
    stale: bool


NO_QUERY_OPTIONS = QueryOptions(index=0, wait=DEFAULT_WAIT, consistent=False, stale=False)


def query_options(request: Request) -> QueryOptions:
    if not request.scope.get("query_string"):
        return NO_QUERY_OPTIONS  # most reads: no query string to parse
    params = request.query_params
    index = 0
    if params.get("index"):
        try:
            index = int(params["index"])
            if index < 0:
                raise ValueError
        except ValueError:
            raise BadRequest("Invalid index") from None
    wait = DEFAULT_WAIT
    if params.get("wait"):
        try:
            wait = parse_duration(params["wait"])
        except DurationError:
            raise BadRequest("Invalid wait time") from None
    wait = min(wait, MAX_WAIT)
    consistent = query_bool(request, "consistent")
    stale = query_bool(request, "stale")
    if consistent and stale:
        raise BadRequest("Cannot specify ?stale with ?consistent, conflicting semantics.")
    return QueryOptions(index=index, wait=wait, consistent=consistent, stale=stale)


class ChangeWaiter:
    """What a blocking query needs: a generation counter and a way to wait for it to move.

    `coalesce` (seconds, 0 = off) is the shortest time a woken blocking query waits from its
    arrival before it answers; see `blocking`."""

    generation: int
    coalesce: float

    async def wait(self, generation: int, timeout: float, unchanged: Callable[[], bool] | None = None) -> None: ...


async def blocking(
    opts: QueryOptions,
    feed: ChangeWaiter,
    read: Callable[[], tuple[int, Any]],
    stamp: Callable[[], Any] | None = None,
) -> tuple[int, Any]:
    """Consul's blocking query: return once the resource's index passes `?index`, or at `wait`.

    `stamp`, if given, is a cheap value that changes whenever `read`'s answer may; while it holds,
    changes elsewhere in the state don't wake this query at all (see ChangeFeed._release).

    Coalescing (`feed.coalesce`): a query woken by a change less than `coalesce` after it arrived
    answers at that mark, with everything that changed meanwhile. A watcher re-arms right after
    each answer, so under churn each one gets at most one answer per `coalesce` instead of one per
    write; the first change after a quiet spell is answered at once, and a query whose index is
    already behind returns at once as before. In the soak (issue #9: ~60 registrations a second,
    20 watchers) 50 ms (the default) cut the answers per run from ~25,000 to ~8,500 and the box's
    busy cores from 0.76 to 0.57; 100 ms cut them to ~5,300 but did not measurably move the read
    tail (seven runs each), so the shorter delay stays. Each answer is a response, a re-armed
    request and, through a client agent, two relays. Consul's proxycfg (200 ms) and Istio (100 ms)
    coalesce watch updates the same way."""
    if not opts.index:
        return read()
    generation = feed.generation
    seen = stamp() if stamp is not None else None  # before the read: a change between is seen
    index, data = read()
    if index > opts.index:
        return index, data
    loop = asyncio.get_running_loop()
    arrived = loop.time()
    # Jitter up to wait/16 spreads the herd of watchers that all time out together.
    deadline = arrived + opts.wait + random.uniform(0, opts.wait / 16)
    answer_from = min(arrived + getattr(feed, "coalesce", 0.0), deadline)
    metrics.BLOCKING_IN_FLIGHT.inc()
    try:
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0 or getattr(feed, "closed", False):
                return index, data
            unchanged = (lambda seen=seen: stamp() == seen) if stamp is not None else None
            await feed.wait(generation, remaining, unchanged)
            generation = feed.generation
            seen = stamp() if stamp is not None else None
            index, data = read()
            if index > opts.index:
                hold = answer_from - loop.time()
                if hold > 0 and not getattr(feed, "closed", False):
                    metrics.BLOCKING_COALESCED.inc()
                    await asyncio.sleep(hold)
                    index, data = read()  # what changed during the hold goes out in this answer
                return index, data
    finally:
        metrics.BLOCKING_IN_FLIGHT.dec()


def compact_json(data: Any) -> bytes:
    """Compact JSON for a reply body. orjson encodes a 100-instance health answer ~9x faster than
    `json`, and encoding was the largest share of a loaded server's CPU. What orjson refuses
    (non-string keys, integers beyond 64 bits) goes through `json`, which accepts them."""
    try:
        return orjson.dumps(data)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(data, separators=(",", ":")).encode()


def json_response(
    data: Any,
    status: int = 200,
    index: int | None = None,
    headers: dict[str, str] | None = None,
    pretty: bool = False,
) -> Response:
    body = json.dumps(data, indent=4).encode() if pretty else compact_json(data)
    out = dict(headers or {})
    if index is not None:
        out["X-Consul-Index"] = str(max(index, 1))
    return Response(body, status_code=status, media_type="application/json", headers=out)


def empty_ok() -> Response:
    return Response(b"", status_code=200)


def error_response(exc: APIError) -> Response:
    return PlainTextResponse(exc.message, status_code=exc.status)


Handler = Callable[[Request], Awaitable[Response]]


def guarded(handler: Handler) -> Handler:
    """Wrap a route handler: API errors become their status; a bug becomes a logged 500."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except APIError as exc:
            return error_response(exc)
        except HTTPException:
            raise
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.url.path)
            return PlainTextResponse("internal error (logged)", status_code=500)

    run.__name__ = getattr(handler, "__name__", "handler")
    return run


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    headers = getattr(exc, "headers", None) or {}
    if status == 405:
        allow = headers.get("Allow", "")
        return PlainTextResponse(
            f"method {request.method} not allowed",
            status_code=405,
            headers={"Allow": ",".join(["OPTIONS"] + [m.strip() for m in allow.split(",") if m.strip()])},
        )
    if status == 404:
        return PlainTextResponse("404 page not found", status_code=404)
    return PlainTextResponse(getattr(exc, "detail", "error"), status_code=status)
