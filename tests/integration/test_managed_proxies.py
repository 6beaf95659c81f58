"""`-managed-proxies`: the agent runs, restarts and stops sidecars for sidecar registrations."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from procs import AgentProc, free_port, free_ports, wait_until


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = b"hello from api"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def managed_agent(tmp_path: Path) -> Iterator[AgentProc]:
    http_port, dns_port = free_ports(2)
    agent = AgentProc("managed", http_port, ["-dev", "-managed-proxies", "-http-port", str(http_port),
                                             "-dns-port", str(dns_port)], tmp_path / "agent.log")
    agent.start()
    try:
        agent.wait_ready()
        yield agent
    finally:
        agent.stop()


def proxy_pids(agent: AgentProc) -> list[int]:
    """Children of the agent that run a proxy (read from /proc, no psutil needed)."""
    assert agent.proc is not None
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == agent.proc.pid and b"lictor.agent.proxy" in cmdline:
            pids.append(int(entry))
    return pids


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_agent_runs_and_stops_sidecars(managed_agent: AgentProc) -> None:
    app_port, upstream_port = free_port(), free_port()
    app = http.server.ThreadingHTTPServer(("127.0.0.1", app_port), Hello)
    threading.Thread(target=app.serve_forever, daemon=True).start()
    try:
        assert managed_agent.put("/v1/agent/service/register", json={
            "Name": "api", "ID": "api-1", "Port": app_port, "Connect": {"SidecarService": {}}}).status_code == 200
        assert managed_agent.put("/v1/agent/service/register", json={
            "Name": "web", "ID": "web-1", "Port": 1, "Connect": {"SidecarService": {"Proxy": {"Upstreams": [
                {"DestinationName": "api", "LocalBindPort": upstream_port}]}}}}).status_code == 200
        wait_until(lambda: len(proxy_pids(managed_agent)) == 2, 15, what="two managed proxies")
        wait_until(lambda: listening(upstream_port), 15, what="upstream listener")

        def through_mesh() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{upstream_port}/", timeout=2).text == "hello from api"
            except httpx.HTTPError:
                return False

        wait_until(through_mesh, 15, 0.2, "a request through web's upstream to api over mTLS")
        # A crashed proxy is restarted.
        victim = proxy_pids(managed_agent)[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: victim not in proxy_pids(managed_agent) and len(proxy_pids(managed_agent)) == 2, 15,
                   what="proxy restarted")
        wait_until(through_mesh, 15, 0.2, "mesh works after the restart")
        # Deregistering the service stops its sidecar.
        assert managed_agent.put("/v1/agent/service/deregister/web-1").status_code == 200
        wait_until(lambda: len(proxy_pids(managed_agent)) == 1, 15, what="web's proxy stopped")
        started = time.monotonic()
        wait_until(lambda: not listening(upstream_port), 10, what="upstream listener closed")
        assert time.monotonic() - started < 10
    finally:
        app.shutdown()
        app.server_close()


def test_dev_gateway_reaches_a_service_through_its_sidecar(tmp_path: Path) -> None:
    http_port, gateway_port, app_port = free_ports(3)
    agent = AgentProc("devgw", http_port, ["-dev", "-dev-gateway", "-gateway-port", str(gateway_port),
                                           "-http-port", str(http_port), "-dns-port", "-1"], tmp_path / "agent.log")
    app = http.server.ThreadingHTTPServer(("127.0.0.1", app_port), Hello)
    threading.Thread(target=app.serve_forever, daemon=True).start()
    agent.start()
    try:
        agent.wait_ready()
        assert agent.put("/v1/config", json={"Kind": "service-defaults", "Name": "api", "Protocol": "http"}).json()
        assert agent.put("/v1/agent/service/register", json={
            "Name": "api", "Port": app_port, "Connect": {"SidecarService": {}}}).status_code == 200

        def through_gateway() -> bool:
            try:
                resp = httpx.get(f"http://127.0.0.1:{gateway_port}/", headers={"Host": "api.ingress.consul"}, timeout=2)
            except httpx.HTTPError:
                return False
            return resp.text == "hello from api"

        wait_until(through_gateway, 30, 0.3, "api through the dev gateway")
    finally:
        agent.stop()
        app.shutdown()
        app.server_close()
