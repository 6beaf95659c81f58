"""Recent logs in memory, streamed by /v1/agent/monitor; and the `lictor monitor` / `lictor debug` commands.

`LogHub` is a logging handler on the root logger keeping the last `RING_SIZE` records and fanning
new ones out to monitor subscribers. While a subscriber asks for a lower level than the agent's
configured one, the root logger is lowered to it (the console handler keeps the configured level),
so `-log-level debug` works on an agent running at info without making idle agents log debug.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import tarfile
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from lictor.errors import BadRequest
from lictor.httpapi import query_bool, query_int

RING_SIZE = 2000
QUEUE_SIZE = 1024  # per subscriber; beyond it lines are dropped (and the drop is reported in-stream)
STALE_SUBSCRIBER = 60.0  # a subscriber whose queue stays full this long is gone: unsubscribe it
TRACE = 5

# Consul's accepted levels (logging.ValidateLogLevel), case-insensitive.
LEVELS = {"trace": TRACE, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
          "warning": logging.WARNING, "err": logging.ERROR, "error": logging.ERROR}


def parse_level(name: str) -> int | None:
    return LEVELS.get(name.strip().lower())


@dataclass(frozen=True)
class Entry:
    created: float
    levelno: int
    name: str
    message: str


def _level_word(levelno: int) -> str:
    if levelno >= logging.ERROR:
        return "ERROR"
    if levelno >= logging.WARNING:
        return "WARN"
    if levelno >= logging.INFO:
        return "INFO"
    if levelno >= logging.DEBUG:
        return "DEBUG"
    return "TRACE"


def format_text(entry: Entry) -> str:
    """hclog's line shape: `2026-01-02T03:04:05.678Z [INFO]  lictor.raft: message`."""
    ts = datetime.fromtimestamp(entry.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    word = _level_word(entry.levelno)
    return f"{ts} [{word}] {' ' * (5 - len(word))}{entry.name}: {entry.message}\n"


def format_json(entry: Entry) -> str:
    ts = datetime.fromtimestamp(entry.created, UTC).isoformat(timespec="microseconds")
    return json.dumps({"@level": _level_word(entry.levelno).lower(), "@message": entry.message,
                       "@module": entry.name, "@timestamp": ts}) + "\n"


@dataclass(eq=False)
class Subscriber:
    loop: asyncio.AbstractEventLoop
    level: int
    queue: asyncio.Queue[Entry] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    dropped: int = 0
    full_since: float = 0.0


class LogHub(logging.Handler):
    def __init__(self, size: int = RING_SIZE) -> None:
        super().__init__(logging.NOTSET)
        self.ring: deque[Entry] = deque(maxlen=size)
        self.subscribers: list[Subscriber] = []
        self.base_level = logging.INFO

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
        except Exception:  # a bad format string must not take logging down
            message = str(record.msg)
        entry = Entry(record.created, record.levelno, record.name, message)
        self.ring.append(entry)
        # Handler.handle holds self.lock here, so the subscriber list is stable.
        for sub in self.subscribers:
            if entry.levelno < sub.level:
                continue
            try:
                if sub.loop.is_closed():
                    continue
                if _on_loop(sub.loop):
                    _offer(sub, entry)
                else:
                    sub.loop.call_soon_threadsafe(_offer, sub, entry)
            except RuntimeError:  # loop closed under us
                continue

    def recent(self, level: int, limit: int) -> list[Entry]:
        entries = [e for e in list(self.ring) if e.levelno >= level]
        return entries[-limit:] if limit else []

    def subscribe(self, level: int) -> Subscriber:
        sub = Subscriber(asyncio.get_running_loop(), level)
        with self.lock:
            self.subscribers.append(sub)
        self._apply_level()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self.lock:
            if sub in self.subscribers:
                self.subscribers.remove(sub)
        self._apply_level()

    def _apply_level(self) -> None:
        wanted = min([self.base_level] + [s.level for s in self.subscribers])
        root = logging.getLogger()
        if root.level != wanted:
            root.setLevel(wanted)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _offer(sub: Subscriber, entry: Entry) -> None:
    try:
        sub.queue.put_nowait(entry)
        sub.full_since = 0.0
    except asyncio.QueueFull:
        sub.dropped += 1
        now = time.monotonic()
        if not sub.full_since:
            sub.full_since = now
        elif now - sub.full_since > STALE_SUBSCRIBER and _hub is not None:
            # Nobody has read for a minute (a response that never started): stop feeding it.
            threading.Thread(target=_hub.unsubscribe, args=(sub,), daemon=True).start()


_hub: LogHub | None = None
_hub_lock = threading.Lock()


def install(level_name: str = "info") -> LogHub:
    """Attach the ring buffer to the root logger (once); console handlers keep `level_name`."""
    global _hub
    level = parse_level(level_name) or logging.INFO
    root = logging.getLogger()
    with _hub_lock:
        if _hub is None:
            _hub = LogHub()
            root.addHandler(_hub)
        quiet = logging.getLogger("httpcore")  # per-request trace noise once root drops to debug
        if quiet.level == logging.NOTSET:
            quiet.setLevel(logging.WARNING)
        for handler in root.handlers:
            if handler is not _hub and handler.level == logging.NOTSET:
                handler.setLevel(level)  # lowering root for a debug monitor must not flood stderr
        _hub.base_level = level
    _hub._apply_level()
    return _hub


def hub() -> LogHub:
    if _hub is None:
        root = logging.getLogger()
        return install(logging.getLevelName(root.level).lower() if root.level else "info")
    return _hub


# -- HTTP ------------------------------------------------------------------------------------


async def agent_monitor(request: Request) -> Response:
    """GET /v1/agent/monitor?loglevel=info[&logjson]: stream log lines until the client goes away.

    Lictor extension: `?history=N` first replays up to N buffered lines (what `lictor debug` uses).
    """
    raw_level = request.query_params.get("loglevel") or "info"
    level = parse_level(raw_level)
    if level is None:
        raise BadRequest(f"Unknown log level: {raw_level}")
    as_json = query_bool(request, "logjson")
    history = min(query_int(request, "history", 0) or 0, RING_SIZE)
    fmt = format_json if as_json else format_text
    log_hub = hub()
    # Subscribe before answering, so everything logged after the request arrived is streamed.
    sub = log_hub.subscribe(level)
    backlog = log_hub.recent(level, history)
    # A line logged between subscribe() and recent() is in both; skip it the second time.
    replayed = {id(e) for e in backlog[-QUEUE_SIZE:]}

    async def lines() -> AsyncIterator[str]:
        try:
            if backlog:
                yield "".join(fmt(e) for e in backlog)
            while True:
                entry = await sub.queue.get()
                if replayed:
                    if id(entry) in replayed:
                        continue
                    replayed.clear()
                chunk = [fmt(entry)]
                while len(chunk) < 256 and not sub.queue.empty():
                    chunk.append(fmt(sub.queue.get_nowait()))
                if sub.dropped:
                    chunk.append(f"[WARN] monitor: dropped {sub.dropped} log lines (client too slow)\n")
                    sub.dropped = 0
                yield "".join(chunk)
        finally:
            log_hub.unsubscribe(sub)

    media = "application/json" if as_json else "text/plain"
    return StreamingResponse(lines(), media_type=media, headers={"Cache-Control": "no-cache"})


# -- CLI -------------------------------------------------------------------------------------


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False)
    parser.add_argument("-http-addr", "--http-addr", dest="http_addr", default=None)
    parser.add_argument("-token", "--token", dest="token", default=os.environ.get("CONSUL_HTTP_TOKEN"))
    return parser


def _headers(token: str | None) -> dict[str, str]:
    return {"X-Consul-Token": token} if token else {}


def cmd_monitor(argv: list[str]) -> int:
    """`lictor monitor [-log-level debug] [-log-json]`: print the agent's log lines until Ctrl-C."""
    import httpx

    from lictor.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, http_addr

    parser = _parser("lictor monitor")
    parser.add_argument("-log-level", "--log-level", dest="log_level", default="info")
    parser.add_argument("-log-json", "--log-json", dest="log_json", action="store_true")
    args = parser.parse_args(argv)
    if parse_level(args.log_level) is None:
        print(f"error: unknown log level {args.log_level!r} (trace, debug, info, warn, err)", file=sys.stderr)
        return EXIT_USAGE
    base = http_addr(args.http_addr)
    params = {"loglevel": args.log_level}
    if args.log_json:
        params["logjson"] = "true"
    try:
        with httpx.stream("GET", base + "/v1/agent/monitor", params=params, headers=_headers(args.token),
                          timeout=httpx.Timeout(10.0, read=None)) as resp:
            if resp.status_code != 200:
                resp.read()
                print(f"error: {resp.status_code} {resp.text.strip()}", file=sys.stderr)
                return EXIT_ERROR
            for text in resp.iter_text():
                sys.stdout.write(text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        return EXIT_OK
    except httpx.ConnectError:
        print(f"error: cannot reach an agent at {base}: is `lictor agent` running?", file=sys.stderr)
        return EXIT_ERROR
    except httpx.HTTPError as exc:
        print(f"error: monitor stream failed: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print("Remote side ended the monitor! This usually means that the remote side has exited or crashed.",
          file=sys.stderr)
    return EXIT_ERROR


def cmd_debug(argv: list[str]) -> int:
    """`lictor debug -output DIR [-duration 5s] [-interval 1s] [-archive=false]`: capture a support bundle.

    DIR gets agent.json, members.json, raft.json, metrics/NN.json + NN.prom (one pair per interval),
    lictor.log (recent and live debug logs), index.json; and DIR.tar.gz beside it unless -archive=false.
    """
    from lictor.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, http_addr
    from lictor.durations import DurationError, parse_duration

    parser = _parser("lictor debug")
    parser.add_argument("-output", "--output", dest="output", default=None)
    parser.add_argument("-duration", "--duration", dest="duration", default="5s")
    parser.add_argument("-interval", "--interval", dest="interval", default="1s")
    parser.add_argument("-archive", "--archive", dest="archive", default="true",
                        help="also write DIR.tar.gz (true/false)")
    args = parser.parse_args(_split_eq(argv, {"-archive", "--archive"}))
    try:
        duration = parse_duration(args.duration)
        interval = parse_duration(args.interval)
    except DurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if duration <= 0 or interval <= 0 or interval > duration:
        print("error: -duration and -interval must be positive, and -interval at most -duration", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.output or f"lictor-debug-{int(time.time())}")
    if out.exists() and any(out.iterdir()):
        print(f"error: output directory {out} already exists and is not empty", file=sys.stderr)
        return EXIT_USAGE
    archive = args.archive.lower() not in ("false", "0", "no")
    base = http_addr(args.http_addr)
    try:
        asyncio.run(_debug(base, _headers(args.token), out, duration, interval))
    except KeyboardInterrupt:
        print("==> Interrupted; the bundle so far is in", out, file=sys.stderr)
        return EXIT_ERROR
    except _DebugError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if archive:
        tar_path = out.with_name(out.name + ".tar.gz")
        with tarfile.open(tar_path, "w:gz") as tar:
            tar.add(out, arcname=out.name)
        print(f"==> Saved debug archive: {tar_path}")
    print(f"==> Capture complete: {out}")
    return EXIT_OK


def _split_eq(argv: list[str], flags: set[str]) -> list[str]:
    """Go-style `-archive=false` for the flags that are booleans in Consul."""
    out: list[str] = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        if name in flags and not sep:
            out += [name, "true"]
        else:
            out += [name, value] if name in flags else [arg]
    return out


class _DebugError(Exception):
    pass


def _dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


async def _debug(base: str, headers: dict[str, str], out: Path, duration: float, interval: float) -> None:
    import httpx

    files: list[str] = []
    errors: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10.0) as client:

        async def fetch(path: str, params: dict[str, str] | None = None) -> httpx.Response | None:
            try:
                resp = await client.get(path, params=params)
            except httpx.HTTPError as exc:
                errors[path] = str(exc) or type(exc).__name__
                return None
            if resp.status_code != 200:
                errors[path] = f"{resp.status_code} {resp.text.strip()}"
                return None
            return resp

        try:
            self_resp = await client.get("/v1/agent/self")
        except httpx.ConnectError:
            raise _DebugError(f"cannot reach an agent at {base}: is `lictor agent` running?") from None
        if self_resp.status_code != 200:
            raise _DebugError(f"GET /v1/agent/self: {self_resp.status_code} {self_resp.text.strip()}")
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics").mkdir(exist_ok=True)
        agent = self_resp.json()
        print(f"==> Starting debugger and capturing static information for {duration:g}s "
              f"(every {interval:g}s) from {base}", flush=True)
        print(f"    Agent: {agent.get('Config', {}).get('NodeName', '?')} "
              f"(server: {agent.get('Config', {}).get('Server')})", flush=True)
        _dump(out / "agent.json", agent)
        files.append("agent.json")
        log_file = (out / "lictor.log").open("w")
        capture = asyncio.create_task(_capture_logs(client, log_file, errors))
        try:
            for name, path in (("members.json", "/v1/agent/members"), ("raft.json", "/v1/operator/raft/configuration")):
                resp = await fetch(path)
                _dump(out / name, resp.json() if resp is not None else {"error": errors.get(path, "")})
                files.append(name)
            loop = asyncio.get_running_loop()
            start = loop.time()
            samples = int(duration / interval + 1e-9) + 1
            for i in range(samples):
                await asyncio.sleep(max(0.0, start + i * interval - loop.time()))
                as_json = await fetch("/v1/agent/metrics")
                prom = await fetch("/v1/agent/metrics", {"format": "prometheus"})
                if as_json is not None:
                    _dump(out / "metrics" / f"{i:02d}.json", as_json.json())
                    files.append(f"metrics/{i:02d}.json")
                if prom is not None:
                    (out / "metrics" / f"{i:02d}.prom").write_text(prom.text)
                    files.append(f"metrics/{i:02d}.prom")
                print(f"    Captured metrics sample {i + 1}/{samples}", flush=True)
        finally:
            await asyncio.sleep(0.2)  # let the last log lines of the capture window arrive
            capture.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await capture
            log_file.close()
    files.append("lictor.log")
    _dump(out / "index.json", {
        "Version": 1, "AgentVersion": agent.get("Config", {}).get("Version", ""),
        "Node": agent.get("Config", {}).get("NodeName", ""), "Address": base,
        "Timestamp": datetime.now(UTC).isoformat(), "Duration": f"{duration:g}s", "Interval": f"{interval:g}s",
        "Files": files, "Errors": errors,
    })


async def _capture_logs(client: Any, log_file: Any, errors: dict[str, str]) -> None:
    import httpx

    params = {"loglevel": "debug", "history": str(RING_SIZE)}
    try:
        async with client.stream("GET", "/v1/agent/monitor", params=params,
                                 timeout=httpx.Timeout(10.0, read=None)) as resp:
            if resp.status_code != 200:
                await resp.aread()
                errors["/v1/agent/monitor"] = f"{resp.status_code} {resp.text.strip()}"
                return
            async for text in resp.aiter_text():
                log_file.write(text)
                log_file.flush()
    except httpx.HTTPError as exc:
        errors["/v1/agent/monitor"] = str(exc) or type(exc).__name__


def register_commands() -> None:
    from lictor.cli import register_command

    register_command("monitor", cmd_monitor)
    register_command("debug", cmd_debug)


# `from lictor import monitor` in the CLI is enough to get the commands.
with contextlib.suppress(ImportError):
    register_commands()
