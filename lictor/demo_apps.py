"""The demo shop's services: small real HTTP apps, each meant to sit behind a sidecar.

`python -m lictor.demo_apps <role> -port P [-version v1] [-fail-rate 0.3] [-upstream name=port ...]`

- product:   lists products; `/pay-directly` tries to call payment (an intention denies it)
- order:     places an order by calling inventory and payment through its sidecar's upstreams
- inventory: reports stock, and which version answered (v1 or v2)
- payment:   takes payments, failing a share of them with 503 so the gateway's retries show

Every app answers `/stats` with its own counters.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import random
import sys
import threading
from collections import Counter
from typing import Any


class App:
    def __init__(self, role: str, version: str, fail_rate: float, upstreams: dict[str, int]) -> None:
        self.role = role
        self.version = version
        self.fail_rate = fail_rate
        self.upstreams = upstreams
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.rng = random.Random()

    def count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def call(self, upstream: str, path: str) -> tuple[int, Any]:
        """Call another service through this app's sidecar (a plain local port)."""
        port = self.upstreams.get(upstream)
        if port is None:
            return 599, {"error": f"no upstream {upstream!r} configured"}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            try:
                return resp.status, json.loads(body)
            except ValueError:
                return resp.status, {"body": body.decode(errors="replace")[:200]}
        except OSError as exc:
            return 599, {"error": f"{upstream} unreachable through the mesh: {exc}"}
        finally:
            conn.close()

    def handle(self, path: str) -> tuple[int, dict[str, Any]]:
        if path == "/stats":
            with self.lock:
                return 200, {"service": self.role, "version": self.version, "counts": dict(self.counts)}
        self.count("requests")
        if self.role == "product":
            if path.startswith("/pay-directly"):
                status, body = self.call("payment", "/")
                self.count(f"payment_{status}")
                return 200, {"service": "product", "tried": "payment", "status": status, "answer": body}
            return 200, {"service": "product", "version": self.version,
                         "products": [{"id": 1, "name": "lamp"}, {"id": 2, "name": "chair"}]}
        if self.role == "inventory":
            self.count(f"version_{self.version}")
            return 200, {"service": "inventory", "version": self.version, "in_stock": 7}
        if self.role == "payment":
            if self.rng.random() < self.fail_rate:
                self.count("failed")
                return 503, {"service": "payment", "error": "card processor timeout (simulated)"}
            self.count("paid")
            return 200, {"service": "payment", "status": "paid"}
        if self.role == "order":
            inv_status, inventory = self.call("inventory", "/")
            pay_status, payment = self.call("payment", "/")
            ok = inv_status == 200 and pay_status == 200
            self.count("placed" if ok else "failed")
            return (200 if ok else 502), {"service": "order", "inventory": inventory, "payment": payment}
        return 404, {"error": f"unknown role {self.role}"}


def make_handler(app: App) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            status, body = app.handle(self.path)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = _reply  # noqa: N815 - http.server's names
        do_POST = _reply  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lictor.demo_apps", allow_abbrev=False)
    parser.add_argument("role", choices=["product", "order", "inventory", "payment"])
    parser.add_argument("-port", "--port", type=int, required=True)
    parser.add_argument("-version", "--version", default="v1")
    parser.add_argument("-fail-rate", "--fail-rate", type=float, default=0.0)
    parser.add_argument("-upstream", "--upstream", action="append", default=[], help="name=local-port")
    args = parser.parse_args(argv)
    upstreams = {}
    for item in args.upstream:
        name, _, port = item.partition("=")
        upstreams[name] = int(port)
    app = App(args.role, args.version, args.fail_rate, upstreams)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(app))
    server.daemon_threads = True
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
