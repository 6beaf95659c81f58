"""`lictor demo`: an e-commerce shop on a service mesh, on this machine, in one command.

It starts an in-memory agent that runs a sidecar for every service (`-managed-proxies`), four small
apps (product, order, inventory v1 + v2, payment), intentions (deny by default; the gateway may
call everything, order may call inventory and payment, product may not call payment), config
entries (HTTP services, inventory split 90/10 between v1 and v2, payment retried on 503), and an
ingress gateway. A small load generator drives traffic through the gateway and the demo prints its
own counters, so the canary split and the retries are visible. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

SERVICES = ("product", "order", "inventory", "payment")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_or_free(port: int) -> int:
    """The port asked for if it is free (0 means any), else any free one."""
    if port == 0:
        return _free_port()
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return port
        except OSError:
            return _free_port()


@dataclass
class Demo:
    http_port: int
    dns_port: int
    gateway_port: int
    workdir: str
    children: list[subprocess.Popen] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def agent(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    # -- processes ------------------------------------------------------------------------------

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(os.path.join(self.workdir, f"{name}.log"), "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.children.append(proc)
        return proc

    def shutdown(self) -> None:
        self.stop.set()
        for proc in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.children:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    # -- setup ----------------------------------------------------------------------------------

    def api(self, method: str, path: str, body: Any = None) -> Any:
        resp = httpx.request(method, self.agent + path, json=body, timeout=10)
        if resp.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {resp.status_code} {resp.text.strip()}")
        return resp.json() if resp.content else None

    def wait_for(self, what: str, predicate: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except (httpx.HTTPError, RuntimeError, OSError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}; logs are in {self.workdir}")

    def start(self) -> None:
        step = Progress()
        step("starting the agent (server, DNS, CA, managed sidecars)")
        self.spawn("agent", ["lictor.cli", "agent", "-dev", "-managed-proxies", "-node", "shop",
                             "-http-port", str(self.http_port), "-dns-port", str(self.dns_port),
                             "-data-dir", os.path.join(self.workdir, "agent")])
        self.wait_for("the agent", lambda: httpx.get(self.agent + "/v1/status/leader", timeout=1).json())

        step("starting product, order, inventory v1 + v2, payment")
        ports = {name: _free_port() for name in ("product", "order", "inventory-v1", "inventory-v2", "payment")}
        up = {"order-inventory": _free_port(), "order-payment": _free_port(), "product-payment": _free_port()}
        self.spawn("product", ["lictor.demo_apps", "product", "-port", str(ports["product"]),
                               "-upstream", f"payment={up['product-payment']}"])
        self.spawn("order", ["lictor.demo_apps", "order", "-port", str(ports["order"]),
                             "-upstream", f"inventory={up['order-inventory']}",
                             "-upstream", f"payment={up['order-payment']}"])
        self.spawn("inventory-v1", ["lictor.demo_apps", "inventory", "-port", str(ports["inventory-v1"]), "-version", "v1"])
        self.spawn("inventory-v2", ["lictor.demo_apps", "inventory", "-port", str(ports["inventory-v2"]), "-version", "v2"])
        self.spawn("payment", ["lictor.demo_apps", "payment", "-port", str(ports["payment"]), "-fail-rate", "0.3"])

        step("registering them, each with a sidecar")

        def register(sid: str, name: str, port: int, meta: dict[str, str] | None = None,
                     upstreams: dict[str, int] | None = None) -> None:
            proxy = {"Upstreams": [{"DestinationName": d, "LocalBindPort": p} for d, p in (upstreams or {}).items()]}
            self.api("PUT", "/v1/agent/service/register", {
                "ID": sid, "Name": name, "Port": port, "Meta": meta or {},
                "Check": {"HTTP": f"http://127.0.0.1:{port}/stats", "Interval": "2s"},
                "Connect": {"SidecarService": {"Proxy": proxy}},
            })

        register("product-1", "product", ports["product"], upstreams={"payment": up["product-payment"]})
        register("order-1", "order", ports["order"],
                 upstreams={"inventory": up["order-inventory"], "payment": up["order-payment"]})
        register("inventory-v1", "inventory", ports["inventory-v1"], meta={"version": "v1"})
        register("inventory-v2", "inventory", ports["inventory-v2"], meta={"version": "v2"})
        register("payment-1", "payment", ports["payment"])

        step("writing intentions: deny by default, then allow what the shop needs")
        for source, destination, action in (("*", "*", "deny"), ("ingress-gw", "*", "allow"),
                                             ("order", "inventory", "allow"), ("order", "payment", "allow"),
                                             ("product", "payment", "deny")):
            self.api("PUT", f"/v1/connect/intentions/exact?source={source}&destination={destination}",
                     {"SourceType": "consul", "Action": action})

        step("writing config entries: HTTP services, a 90/10 canary for inventory, retries for payment")
        for name in SERVICES:
            self.api("PUT", "/v1/config", {"Kind": "service-defaults", "Name": name, "Protocol": "http"})
        self.api("PUT", "/v1/config", {
            "Kind": "service-resolver", "Name": "inventory", "DefaultSubset": "v1",
            "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"Filter": "Service.Meta.version == v2"}},
        })
        self.api("PUT", "/v1/config", {"Kind": "service-splitter", "Name": "inventory", "Splits": [
            {"Weight": 90, "ServiceSubset": "v1"}, {"Weight": 10, "ServiceSubset": "v2"}]})
        self.api("PUT", "/v1/config", {"Kind": "service-router", "Name": "payment", "Routes": [{
            "Match": {"HTTP": {"PathPrefix": "/"}},
            "Destination": {"NumRetries": 3, "RetryOnStatusCodes": [503], "RetryOnConnectFailure": True},
        }]})
        self.api("PUT", "/v1/config", {
            "Kind": "ingress-gateway", "Name": "ingress-gw",
            "Listeners": [{"Port": self.gateway_port, "Protocol": "http",
                           "Services": [{"Name": name, "Hosts": [f"{name}.localhost"]} for name in SERVICES]}],
        })

        step(f"starting the ingress gateway on 127.0.0.1:{self.gateway_port}")
        self.api("PUT", "/v1/agent/service/register",
                 {"ID": "ingress-gw", "Name": "ingress-gw", "Kind": "ingress-gateway", "Port": self.gateway_port})
        self.spawn("gateway", ["lictor.gateway", "-service", "ingress-gw", "-http-addr", f"127.0.0.1:{self.http_port}"])
        for name in SERVICES:
            if name == "payment":
                continue  # fails 30 % of the time by design; the others must answer
            self.wait_for(f"{name} through the gateway",
                          lambda n=name: self.gateway_get(n, "/").status_code == 200, timeout=60)

    def gateway_get(self, service: str, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.gateway_port}{path}", headers={"Host": f"{service}.localhost"},
                         timeout=10)

    # -- the tour and the counters ------------------------------------------------------------

    def tour(self) -> str:
        g, h, d = self.gateway_port, self.http_port, self.dns_port
        return f"""
==> The shop is open. Try:

  curl -s -H 'Host: product.localhost'   localhost:{g}/            # through the gateway and product's sidecar
  curl -s -H 'Host: inventory.localhost' localhost:{g}/            # 90 % v1, 10 % v2 (a canary)
  curl -s -H 'Host: order.localhost'     localhost:{g}/            # order calls inventory and payment over mTLS
  curl -s -H 'Host: payment.localhost'   localhost:{g}/            # payment fails 30 %; the gateway retries 503s
  curl -s -H 'Host: product.localhost'   localhost:{g}/pay-directly   # product -> payment: denied by intention
  dig @127.0.0.1 -p {d} inventory.service.consul SRV +short
  curl -s localhost:{h}/v1/connect/intentions | python3 -m json.tool
  LICTOR_HTTP_ADDR=127.0.0.1:{h} .venv/bin/lictor intention check product payment

  Move the canary: curl -X PUT localhost:{h}/v1/config -d '{{"Kind": "service-splitter", "Name": "inventory",
      "Splits": [{{"Weight": 50, "ServiceSubset": "v1"}}, {{"Weight": 50, "ServiceSubset": "v2"}}]}}'

  Logs: {self.workdir}    Ctrl-C stops everything.
"""

    def load(self, rate: float) -> None:
        """Steady traffic through the gateway: inventory (split) and payment (retried)."""
        period = 1.0 / rate
        with httpx.Client(timeout=10) as client:
            i = 0
            while not self.stop.is_set():
                service = "payment" if i % 4 == 3 else "inventory"
                try:
                    resp = client.get(f"http://127.0.0.1:{self.gateway_port}/", headers={"Host": f"{service}.localhost"})
                    if service == "inventory" and resp.status_code == 200:
                        key = f"inventory_{resp.json().get('version')}"
                    else:
                        key = f"{service}_{resp.status_code}"
                except (httpx.HTTPError, ValueError):
                    key = f"{service}_error"
                with self.lock:
                    self.counts[key] += 1
                i += 1
                self.stop.wait(period)

    def report(self) -> dict[str, Any]:
        with self.lock:
            counts = dict(self.counts)
        v1, v2 = counts.get("inventory_v1", 0), counts.get("inventory_v2", 0)
        app_failures = 0
        try:
            stats = httpx.get(self.agent + "/v1/agent/services", timeout=5).json()
            port = stats["payment-1"]["Port"]
            app_failures = httpx.get(f"http://127.0.0.1:{port}/stats", timeout=5).json()["counts"].get("failed", 0)
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        payment_ok = counts.get("payment_200", 0)
        payment_total = sum(v for k, v in counts.items() if k.startswith("payment_"))
        return {"inventory_v1": v1, "inventory_v2": v2,
                "inventory_v2_share": round(100.0 * v2 / (v1 + v2), 1) if v1 + v2 else 0.0,
                "payment_requests": payment_total, "payment_ok": payment_ok,
                "payment_app_failures": app_failures, "counts": counts}


class Progress:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, message: str) -> None:
        self.n += 1
        print(f"[{self.n}/6] {message}", flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lictor demo", allow_abbrev=False)
    parser.add_argument("-http-port", "--http-port", type=int, default=8500)
    parser.add_argument("-dns-port", "--dns-port", type=int, default=8600)
    parser.add_argument("-gateway-port", "--gateway-port", type=int, default=8080)
    parser.add_argument("-duration", "--duration", type=float, default=0, help="stop after N seconds (0 = until Ctrl-C)")
    parser.add_argument("-rate", "--rate", type=float, default=20.0, help="requests/s the built-in load sends")
    parser.add_argument("-report-every", "--report-every", type=float, default=10.0)
    args = parser.parse_args(argv)
    demo = Demo(_port_or_free(args.http_port), _port_or_free(args.dns_port), _port_or_free(args.gateway_port),
                tempfile.mkdtemp(prefix="lictor-demo-"))
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    started_ok = False
    try:
        demo.start()
        started_ok = True
        print(demo.tour(), flush=True)
        print("==> processes: " + " ".join(str(p.pid) for p in demo.children), flush=True)
        threading.Thread(target=demo.load, args=(args.rate,), daemon=True).start()
        started = time.monotonic()
        next_report = started + args.report_every
        while not stopping.is_set():
            if args.duration and time.monotonic() - started >= args.duration:
                break
            if time.monotonic() >= next_report:
                r = demo.report()
                print(f"--> inventory v1 {r['inventory_v1']}, v2 {r['inventory_v2']} ({r['inventory_v2_share']} % v2) | "
                      f"payment {r['payment_ok']}/{r['payment_requests']} ok through the gateway, "
                      f"{r['payment_app_failures']} failures at the app hidden by retries", flush=True)
                next_report += args.report_every
            stopping.wait(0.2)
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if started_ok:
            print("==> final counters " + json.dumps(demo.report()), flush=True)
        print("==> stopping the demo", flush=True)
        demo.shutdown()
    return 0
