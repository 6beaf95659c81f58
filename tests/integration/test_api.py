"""Consul's HTTP API on a real `lictor agent -dev`, through py-consul, httpx and curl."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import consul
import httpx
import pytest
from procs import AgentProc, running_dev_agent


def client(agent: AgentProc) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=agent.http_port, connections_timeout=10)


def test_catalog_health_and_kv_through_py_consul(dev_agent: AgentProc) -> None:
    c = client(dev_agent)
    assert c.catalog.datacenters() == ["dc1"]
    assert c.catalog.register("ext1", "10.1.0.1", service={"service": "web", "port": 80, "tags": ["v1"]},
                              check={"name": "web alive", "status": "passing", "serviceid": "web"})
    assert c.catalog.register("ext2", "10.1.0.2", service={"service": "web", "port": 81},
                              check={"name": "web down", "status": "critical", "serviceid": "web"})
    index, services = c.catalog.services()
    assert services["web"] == ["v1"] and "consul" in services and int(index) > 0
    _, nodes = c.catalog.service("web", tag="v1")
    assert [n["Node"] for n in nodes] == ["ext1"]
    _, healthy = c.health.service("web", passing=True)
    assert [e["Node"]["Node"] for e in healthy] == ["ext1"]
    _, node = c.catalog.node("ext2")
    assert list(node["Services"]) == ["web"]
    assert c.catalog.node("nope")[1] is None
    _, checks = c.health.state("passing")
    assert any(ch["CheckID"] == "web alive" for ch in checks)
    with pytest.raises(consul.ConsulException):
        c.catalog.services(dc="dc9")
    assert c.catalog.deregister("ext2")
    assert [n["Node"] for n in c.catalog.service("web")[1]] == ["ext1"]
    # KV
    assert c.kv.put("app/config/db", "postgres://x")
    assert c.kv.put("app/config/cache", "redis", flags=7)
    _, entry = c.kv.get("app/config/cache")
    assert entry["Value"] == b"redis" and entry["Flags"] == 7
    assert c.kv.put("app/config/cache", "no", cas=0) is False
    assert c.kv.put("app/config/cache", "yes", cas=entry["ModifyIndex"]) is True
    _, keys = c.kv.get("app/", keys=True, separator="/")
    assert keys == ["app/config/"]
    _, tree = c.kv.get("app/", recurse=True)
    assert [e["Key"] for e in tree] == ["app/config/cache", "app/config/db"]
    index, missing = c.kv.get("nope")
    assert missing is None and int(index) > 0
    assert c.kv.put("empty", "")
    assert c.kv.get("empty")[1]["Value"] is None
    assert c.kv.delete("app/", recurse=True)
    assert c.kv.get("app/config/db")[1] is None
    assert c.status.leader() and c.status.peers()
    assert c.txn.put([{"KV": {"Verb": "set", "Key": "t1", "Value": "dHgx"}}])["Errors"] is None


def test_blocking_queries_wake_on_change_and_delete(dev_agent: AgentProc) -> None:
    c = client(dev_agent)
    assert c.kv.put("watched", "1")
    index, _ = c.kv.get("watched")
    woke: dict[str, float] = {}

    def watch() -> None:
        started = time.monotonic()
        new_index, data = c.kv.get("watched", index=index, wait="20s")
        woke["after"] = time.monotonic() - started
        woke["index"] = int(new_index)
        woke["deleted"] = data is None

    thread = threading.Thread(target=watch)
    thread.start()
    time.sleep(0.5)
    assert c.kv.delete("watched")
    thread.join(15)
    assert woke["deleted"] and woke["index"] > int(index) and 0.4 < woke["after"] < 5
    # Without a change, the query returns at `wait`.
    index, _ = c.catalog.services()
    started = time.monotonic()
    again, _ = c.catalog.services(index=index, wait="1s")
    assert again == index and 0.9 < time.monotonic() - started < 3
    resp = httpx.get(f"{dev_agent.url}/v1/catalog/services?index=abc")
    assert resp.status_code == 400 and "Invalid index" in resp.text
    resp = httpx.get(f"{dev_agent.url}/v1/catalog/services?index=1&wait=forever")
    assert resp.status_code == 400 and "Invalid wait" in resp.text
    resp = httpx.get(f"{dev_agent.url}/v1/catalog/services?stale&consistent")
    assert resp.status_code == 400 and "conflicting" in resp.text
    headers = httpx.get(f"{dev_agent.url}/v1/catalog/nodes?consistent").headers
    assert headers["X-Consul-KnownLeader"] == "true" and headers["X-Consul-Effective-Consistency"] == "consistent"


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "decode"),
        (b'{"Node": 5, "Address": "1.2.3.4"}', 400, "Node"),
        (b'{"Address": "1.2.3.4"}', 400, "Must provide node"),
        (b'{"Node": "n"}', 400, "Must provide address"),
        (b'{"Node": "n", "Address": "1.2.3.4", "Service": {"Service": "w", "Port": "80"}}', 400, "Service.Port"),
        (b'{"Node": "n", "Address": "1.2.3.4", "Service": {"ID": "w"}}', 400, "service name"),
        (b'{"Node": "n\\u0007", "Address": "1.2.3.4"}', 400, "control characters"),
        (b'{"Node": "n", "Address": "1.2.3.4", "Bogus": 1}', 400, 'unknown field "Bogus"'),
        (b'{"Node": "n", "Address": "1.2.3.4", "Check": {"CheckID": "c", "Status": "great"}}', 400, "status"),
        (b'{"Node": "n", "Address": "1.2.3.4", "Service": {"Service": "w"}, "Check": {"CheckID": "c", "ServiceID": "x"}}',
         404, "Unknown service ID"),
        (b"[1, 2]", 400, "cannot unmarshal"),
    ],
)
def test_bad_catalog_input_is_refused_and_nothing_half_applied(dev_agent: AgentProc, body: bytes, status: int, needle: str) -> None:
    before = httpx.get(f"{dev_agent.url}/v1/catalog/nodes").json()
    resp = httpx.put(f"{dev_agent.url}/v1/catalog/register", content=body)
    assert resp.status_code == status, resp.text
    assert needle.lower() in resp.text.lower(), resp.text
    assert httpx.get(f"{dev_agent.url}/v1/catalog/nodes").json() == before


def test_oversized_bodies_get_413(dev_agent: AgentProc) -> None:
    big = b'{"Node": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    resp = httpx.put(f"{dev_agent.url}/v1/catalog/register", content=big, timeout=30)
    assert resp.status_code == 413 and "too large" in resp.text
    resp = httpx.put(f"{dev_agent.url}/v1/kv/big", content=b"v" * (600 * 1024), timeout=30)
    assert resp.status_code == 413 and "kv_max_value_size" in resp.text
    assert httpx.get(f"{dev_agent.url}/v1/kv/big").status_code == 404


def test_methods_and_kv_errors(dev_agent: AgentProc) -> None:
    resp = httpx.get(f"{dev_agent.url}/v1/catalog/register")
    assert resp.status_code == 405 and "method GET not allowed" in resp.text and "PUT" in resp.headers["Allow"]
    assert httpx.put(f"{dev_agent.url}/v1/kv/k?flags=x", content=b"v").status_code == 400
    resp = httpx.delete(f"{dev_agent.url}/v1/kv/k?recurse&cas=3")
    assert resp.status_code == 400 and "cas" in resp.text
    resp = httpx.put(f"{dev_agent.url}/v1/txn", json=[{"KV": {"Verb": "explode", "Key": "a"}}])
    assert resp.status_code == 400 and "explode" in resp.text
    resp = httpx.get(f"{dev_agent.url}/v1/health/state/sideways")
    assert resp.status_code == 400
    resp = httpx.get(f"{dev_agent.url}/v1/health/service/web?passing=maybe")
    assert resp.status_code == 400 and "passing" in resp.text


def test_curl_reads_the_catalog(dev_agent: AgentProc) -> None:
    out = subprocess.run(["curl", "-s", "-i", f"{dev_agent.url}/v1/catalog/services"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0
    head, _, body = out.stdout.partition("\n\n")  # text mode turns CRLF into LF
    assert "x-consul-index" in head.lower()
    assert "consul" in json.loads(body)


def test_blocking_queries_coalesce_changes_soon_after_they_arrive(tmp_path: Path) -> None:
    """-blocking-coalesce: a watcher woken within the interval of asking answers at its end, with
    every change made meanwhile; a change after a quiet spell is answered at once (py-consul)."""
    with running_dev_agent(tmp_path, "coalesce", "-blocking-coalesce", "1s") as agent:
        c = client(agent)
        index, _ = c.catalog.services()
        woke: dict[str, Any] = {}

        def watch(since: str, key: str) -> None:
            started = time.monotonic()
            new_index, services = c.catalog.services(index=since, wait="20s")
            woke[key] = (time.monotonic() - started, new_index, services)

        thread = threading.Thread(target=watch, args=(index, "soon"))
        thread.start()
        time.sleep(0.1)
        c.agent.service.register("first", port=1)  # wakes the watcher 0.1 s after it asked
        time.sleep(0.3)
        c.agent.service.register("second", port=2)  # during the hold: in the same answer
        thread.join(15)
        after, new_index, services = woke["soon"]
        assert after >= 1.0 and after < 6
        assert {"first", "second"} <= set(services)
        # Quiet for longer than the interval, then a change: no hold.
        thread = threading.Thread(target=watch, args=(new_index, "quiet"))
        thread.start()
        time.sleep(1.5)
        changed = time.monotonic()
        c.agent.service.register("third", port=3)
        thread.join(15)
        after, _, services = woke["quiet"]
        assert "third" in services
        assert after >= 1.5 and time.monotonic() - changed < 0.9  # answered well before another 1 s hold
