"""TLS for the HTTP API (issue #9): an HTTPS listener next to (or instead of) HTTP, client certificates
required with -verify-incoming, and client agents, the CLI and py-consul talking to it.

Certificates are made with `openssl` by tests/tlsutil.py: an ECDSA P-256 CA, a server cert for 127.0.0.1,
a client cert from the same CA, and a second ("rogue") CA with its own client cert."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import consul
import httpx
import pytest
from procs import LICTOR, AgentProc, cluster_key, free_ports, wait_until
from tlsutil import Certs, client_context, make_certs
from tlsutil import curl as _curl
from tlsutil import tls_args as _tls_args


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _wait_https(url: str, certs: Certs, proc: AgentProc) -> None:
    def ready() -> bool:
        if not proc.alive():
            raise AssertionError(f"{proc.name} exited: {proc.tail()}")
        resp = httpx.get(url + "/v1/agent/self", verify=client_context(certs), timeout=2)
        return resp.status_code == 200

    wait_until(ready, 30, 0.1, f"{proc.name} ready over HTTPS")


@pytest.fixture
def tls_agent(tmp_path: Path, certs: Certs) -> Iterator[tuple[AgentProc, int]]:
    http_port, https_port = free_ports(2)
    agent = AgentProc("tls", http_port, ["-dev", "-node", "tls", "-http-port", str(http_port), "-dns-port", "-1",
                                         *_tls_args(certs, https_port)], tmp_path / "tls.log")
    agent.start()
    try:
        agent.wait_ready()
        yield agent, https_port
    finally:
        agent.kill()


def test_https_listener_requires_client_cert(tls_agent: tuple[AgentProc, int], certs: Certs) -> None:
    agent, https_port = tls_agent
    url = f"https://127.0.0.1:{https_port}/v1/status/leader"
    # The plain listener keeps working next to the HTTPS one.
    assert agent.get("/v1/status/leader").status_code == 200
    client_cert = ["--cert", str(certs.client[0]), "--key", str(certs.client[1])]

    ok = _curl(url, "--cacert", str(certs.ca), *client_cert)
    assert ok.returncode == 0 and ok.stdout == "200", ok
    # No client certificate: the handshake (TLS 1.2) or the first read (TLS 1.3) fails.
    for tls in ("--tlsv1.2 --tls-max 1.2", "--tlsv1.3"):
        no_cert = _curl(url, "--cacert", str(certs.ca), *tls.split())
        assert no_cert.returncode != 0 and no_cert.stdout in ("", "000"), (tls, no_cert)
    # A client cert from another CA: refused.
    rogue = _curl(url, "--cacert", str(certs.ca), "--cert", str(certs.rogue_client[0]), "--key", str(certs.rogue_client[1]))
    assert rogue.returncode != 0 and rogue.stdout in ("", "000"), rogue
    # The client trusting the wrong CA refuses the server (curl exit 60: peer certificate not verified).
    wrong_ca = _curl(url, "--cacert", str(certs.rogue_ca), *client_cert)
    assert wrong_ca.returncode == 60, wrong_ca
    # Plain HTTP spoken to the HTTPS port gets nothing useful.
    plain = _curl(f"http://127.0.0.1:{https_port}/v1/status/leader")
    assert plain.stdout != "200", plain


def _s_client(port: int, *args: str) -> str:
    proc = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", "-verify_return_error",
         "-ign_eof", *args],
        input="GET /v1/status/leader HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        capture_output=True, text=True, timeout=20,
    )
    return proc.stdout + proc.stderr


def test_openssl_s_client(tls_agent: tuple[AgentProc, int], certs: Certs) -> None:
    _agent, port = tls_agent
    good = _s_client(port, "-CAfile", str(certs.ca), "-cert", str(certs.client[0]), "-key", str(certs.client[1]))
    assert "HTTP/1.1 200" in good and "Verify return code: 0 (ok)" in good, good[-2000:]
    no_cert = _s_client(port, "-CAfile", str(certs.ca))
    # TLS 1.3: the handshake completes on the client's side, then the server drops the connection
    # (an alert, EOF or a reset, depending on timing) instead of answering.
    assert "HTTP/1.1" not in no_cert, no_cert[-2000:]
    assert any(s in no_cert.lower() for s in ("alert", "unexpected eof", "errno=104")), no_cert[-2000:]
    wrong_ca = _s_client(port, "-CAfile", str(certs.rogue_ca), "-cert", str(certs.client[0]), "-key", str(certs.client[1]))
    assert "HTTP/1.1 200" not in wrong_ca and "verify error" in wrong_ca.lower(), wrong_ca[-2000:]


def test_py_consul_over_https(tls_agent: tuple[AgentProc, int], certs: Certs) -> None:
    _agent, port = tls_agent
    c = consul.Consul(host="127.0.0.1", port=port, scheme="https", verify=str(certs.ca),
                      cert=(str(certs.client[0]), str(certs.client[1])))
    assert c.kv.put("tls/hello", "world") is True
    _index, entry = c.kv.get("tls/hello")
    assert entry is not None and entry["Value"] == b"world"
    c.agent.service.register("web", service_id="web-1", port=8080)
    assert "web-1" in c.agent.services()
    assert c.status.leader()
    no_cert = consul.Consul(host="127.0.0.1", port=port, scheme="https", verify=str(certs.ca))
    with pytest.raises(Exception):  # noqa: B017 - requests' SSLError/ConnectionError, whichever comes first
        no_cert.kv.get("tls/hello")


def test_https_only_from_json_config(tmp_path: Path, certs: Certs) -> None:
    https_port = free_ports(1)[0]
    config = tmp_path / "tls.json"
    config.write_text(json.dumps({
        "ports": {"http": -1, "https": https_port, "dns": -1},
        "cert_file": str(certs.server[0]), "key_file": str(certs.server[1]), "ca_file": str(certs.ca),
        "verify_incoming": True,
    }))
    agent = AgentProc("tlsonly", https_port, ["-dev", "-node", "tlsonly", "-config-file", str(config)],
                      tmp_path / "tlsonly.log")
    agent.start()
    try:
        url = f"https://127.0.0.1:{https_port}"
        _wait_https(url, certs, agent)
        assert "HTTPS API: https://127.0.0.1:" in agent.tail() and "HTTP API: http://" not in agent.tail()
        # The CLI: Consul's environment variables.
        env = dict(os.environ, CONSUL_HTTP_ADDR=f"127.0.0.1:{https_port}", CONSUL_HTTP_SSL="true",
                   CONSUL_CACERT=str(certs.ca), CONSUL_CLIENT_CERT=str(certs.client[0]),
                   CONSUL_CLIENT_KEY=str(certs.client[1]))
        members = subprocess.run(LICTOR + ["members"], env=env, capture_output=True, text=True, timeout=30)
        assert members.returncode == 0 and "tlsonly" in members.stdout, members
        env.pop("CONSUL_CLIENT_CERT")
        refused = subprocess.run(LICTOR + ["members"], env=env, capture_output=True, text=True, timeout=30)
        assert refused.returncode != 0, refused
    finally:
        agent.kill()


def test_config_errors(tmp_path: Path, certs: Certs) -> None:
    base = LICTOR + ["agent", "-dev", "-dns-port", "-1"]
    cases = [
        (["-https-port", "18501"], "-https-port needs -cert-file"),
        (["-https-port", "18501", "-cert-file", str(certs.server[0]), "-key-file", str(certs.server[1]),
          "-verify-incoming"], "-verify-incoming needs -ca-file"),
        (["-http-port", "-1"], "no API"),
    ]
    for extra, message in cases:
        proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=30)
        assert proc.returncode != 0 and message in proc.stdout + proc.stderr, (extra, proc)


def test_client_agent_joins_https_server(tmp_path: Path, certs: Certs) -> None:
    """A client agent whose servers listen on HTTPS only (for it) with client certs required."""
    http_port, https_port, raft_port, client_port = free_ports(4)
    server = AgentProc(
        "server", http_port,
        ["-server", "-bootstrap-expect", "1", "-node", "srv", "-data-dir", str(tmp_path / "srv"),
         "-http-port", str(http_port), "-raft-port", str(raft_port), "-encrypt", cluster_key(), "-dns-port", "-1",
         *_tls_args(certs, https_port)],
        tmp_path / "server.log", raft_port=raft_port,
    )
    client = AgentProc(
        "client", client_port,
        ["-node", "cli1", "-data-dir", str(tmp_path / "cli1"), "-http-port", str(client_port), "-dns-port", "-1",
         "-retry-join", f"127.0.0.1:{https_port}", "-ca-file", str(certs.ca),
         "-client-cert", str(certs.client[0]), "-client-key", str(certs.client[1]), "-heartbeat-interval", "0.5s"],
        tmp_path / "client.log", env={"LICTOR_HTTP_SSL": "true"},
    )
    server.start()
    try:
        server.wait_ready()
        wait_until(server.leader, 20, what="leader")
        client.start()
        client.wait_ready()
        assert client.put("/v1/agent/service/register", json={"Name": "api", "ID": "api-1", "Port": 9000}).status_code == 200
        wait_until(lambda: server.get("/v1/catalog/service/api").json(), 15, 0.1, "api in the server's catalog")
        # Forwarded reads and KV go over HTTPS too.
        assert client.put("/v1/kv/via-client", content=b"x").json() is True
        assert server.get("/v1/kv/via-client?raw").content == b"x"
        assert [n["Node"] for n in client.get("/v1/catalog/nodes").json()].count("cli1") == 1
    finally:
        client.kill()
        server.kill()


def test_client_agent_without_cert_is_refused(tmp_path: Path, certs: Certs) -> None:
    http_port, https_port, client_port = free_ports(3)
    server = AgentProc("tls", http_port, ["-dev", "-node", "tls", "-http-port", str(http_port), "-dns-port", "-1",
                                          *_tls_args(certs, https_port)], tmp_path / "tls.log")
    client = AgentProc(
        "client", client_port,
        ["-node", "cli2", "-data-dir", str(tmp_path / "cli2"), "-http-port", str(client_port), "-dns-port", "-1",
         "-retry-join", f"https://127.0.0.1:{https_port}", "-ca-file", str(certs.ca)],
        tmp_path / "client.log",
    )
    server.start()
    try:
        server.wait_ready()
        client.start()
        client.wait_ready()
        resp = client.get("/v1/catalog/nodes")
        assert resp.status_code == 500 and "No known Consul servers reachable" in resp.text, resp.text
    finally:
        client.kill()
        server.kill()
