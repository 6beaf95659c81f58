"""`lictor connect proxy` / `python -m lictor.agent.proxy`: run a Connect sidecar proxy.

Flags take Consul's single-dash Go style or the double-dash form: `-sidecar-for web`,
`--http-addr 127.0.0.1:8500`, `-metrics-port 9102`, `-log-level debug`. Tracing and access logs:
`-otlp-endpoint URL`, `-trace-sample-ratio R`, `-access-log PATH|-`; without them the registration's
`Proxy.Config` keys `otlp_endpoint`, `trace_sample_ratio`, `access_log` apply (managed proxies).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from lictor.agent.proxy.proxy import ProxyError, run_proxy

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lictor connect proxy", allow_abbrev=False,
                                     description="Run a Connect sidecar proxy for a local service instance.")

    def flag(name: str, **kwargs: object) -> None:
        parser.add_argument(f"-{name}", f"--{name}", dest=name.replace("-", "_"), **kwargs)  # type: ignore[arg-type]

    flag("sidecar-for", default=None, help="ID of the service instance this proxy fronts")
    flag("proxy-id", default=None, help="ID of the connect-proxy registration (instead of -sidecar-for)")
    flag("http-addr", default=None, help="local agent HTTP address (default $CONSUL_HTTP_ADDR or 127.0.0.1:8500)")
    flag("token", default=os.environ.get("CONSUL_HTTP_TOKEN"), help="ACL token")
    flag("metrics-port", type=int, default=None, help="serve /metrics and /stats on 127.0.0.1:<port>")
    flag("log-level", default="info", choices=["trace", "debug", "info", "warn", "warning", "error"])
    flag("default-intention-policy", default=None, choices=["allow", "deny"],
         help="override the agent's default intention policy")
    flag("otlp-endpoint", default=os.environ.get("LICTOR_OTLP_ENDPOINT"),
         help="export trace spans over OTLP/HTTP (JSON) to this URL ('' = off; default $LICTOR_OTLP_ENDPOINT, "
              "else the registration's Proxy.Config otlp_endpoint)")
    flag("trace-sample-ratio", type=float, default=None,
         help="share of the traces this proxy starts that are recorded, 0..1; a caller's sampled flag wins "
              "(default Proxy.Config trace_sample_ratio, else 1.0)")
    flag("access-log", default=None,
         help="one JSON line per http request to this file, or '-' for stdout ('' = off; default "
              "Proxy.Config access_log)")
    return parser


def _http_addr(value: str | None) -> str:
    return value or os.environ.get("LICTOR_HTTP_ADDR") or os.environ.get("CONSUL_HTTP_ADDR") or "127.0.0.1:8500"


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not args.sidecar_for and not args.proxy_id:
        print("error: -sidecar-for <service-id> (or -proxy-id) is required", file=sys.stderr)
        return 2
    level = {"trace": "DEBUG", "warn": "WARNING"}.get(args.log_level, args.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s [%(levelname)s] %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per blocking query is noise

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_proxy(_http_addr(args.http_addr), args.sidecar_for, proxy_id=args.proxy_id,
                        metrics_port=args.metrics_port, default_intention_policy=args.default_intention_policy,
                        token=args.token, stop=stop, otlp_endpoint=args.otlp_endpoint,
                        trace_sample_ratio=args.trace_sample_ratio, access_log=args.access_log)

    try:
        import uvloop  # the data plane wants uvloop: its SSL and TCP transports are ~1.7x faster

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.Runner()
    try:
        with runner:
            runner.run(serve())
    except ProxyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
