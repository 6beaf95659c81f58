"""Hypothesis over the HTTP API: it answers 2xx or 4xx, never 500, nothing half-applies, nothing hangs.

The registry routes run in-process over the in-memory log (no sockets), so thousands of requests
take seconds. Every example gets a fresh store (copied from a small seeded one), so a failure
reproduces from its example alone; state built up by a *sequence* of requests is the job of the
stateful machine at the end (`TestRegistrySequences`), which hypothesis shrinks to a minimal sequence.
Agent-side decoders are fuzzed directly. See docs/fuzzing.md for long runs.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import time
from typing import Any
from urllib.parse import quote, urlencode

import httpx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from starlette.applications import Starlette
from starlette.testclient import TestClient

from lictor.agent.definitions import decode_check_registration, decode_service_registration
from lictor.durations import DurationError, parse_duration
from lictor.errors import APIError
from lictor.httpapi import method_not_allowed
from lictor.registry.http import RegistryAPI, ServerInfo
from lictor.registry.raft import LocalLog
from lictor.registry.state import StateStore


def _examples(default: int) -> int:
    """LICTOR_FUZZ_EXAMPLES=20000 for a long run (docs/fuzzing.md); the small default keeps CI fast."""
    return int(os.environ.get("LICTOR_FUZZ_EXAMPLES") or default)


# print_blob: a failure prints an @reproduce_failure line, so it replays without the shared database.
FUZZ = settings(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])


def fuzz(default_examples: int) -> settings:
    return settings(FUZZ, max_examples=_examples(default_examples))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)
field_names = st.sampled_from(
    ["Node", "Address", "Service", "Check", "Checks", "ID", "Port", "Tags", "Meta", "Status", "ServiceID",
     "CheckID", "name", "port", "TaggedAddresses", "NodeMeta", "SkipNodeUpdate", "Weights", "Definition",
     "Interval", "TTL", "HTTP", "TCP", "Args", "Connect", "SidecarService", "Proxy", "KV", "Verb", "Key", "Value",
     "Kind", "Native", "DestinationServiceName", "Format", "Version", "State", "nodes", "services", "kv"]
)
# Names and verbs the code acts on, so structured bodies get past validation and reach the store.
words = st.sampled_from(
    ["10s", "1.2.3.4", "passing", "critical", "n1", "web", "db", "web-1", "a", "a/b", "fuzz", "connect-proxy",
     "set", "cas", "get", "get-tree", "check-index", "check-not-exists", "delete", "delete-tree", "delete-cas",
     "lictor-snapshot", "aGk="]
)
structured = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=12) | words,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(field_names, children, max_size=6),
    max_leaves=25,
)
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    structured.map(lambda v: json.dumps(v).encode()),
)

# -- the app over a fresh store ------------------------------------------------------------------


def _seed_store() -> StateStore:
    """Two nodes, a service with a sidecar and a native one, checks in every state, a KV tree."""
    log = LocalLog()
    client = _client_for(log)
    svc = {"Service": "web", "ID": "web-1", "Tags": ["v1", "primary"], "Port": 80, "Meta": {"env": "prod"},
           "TaggedAddresses": {"lan": {"Address": "10.0.0.1", "Port": 80}}}
    for body in (
        {"Node": "n1", "Address": "10.0.0.1", "NodeMeta": {"rack": "a"}, "TaggedAddresses": {"wan": "1.2.3.4"},
         "Service": svc, "Checks": [{"CheckID": "web-http", "ServiceID": "web-1", "Status": "passing"},
                                    {"CheckID": "mem", "Status": "warning"}]},
        {"Node": "n1", "Address": "10.0.0.1", "NodeMeta": {"rack": "a"}, "TaggedAddresses": {"wan": "1.2.3.4"},
         "Service": {"Service": "web-sidecar-proxy", "Kind": "connect-proxy", "Port": 21000,
                     "Proxy": {"DestinationServiceName": "web", "Upstreams": []}}},
        {"Node": "n2", "Address": "10.0.0.2", "Service": {"Service": "db", "Port": 5432, "Connect": {"Native": True}},
         "Check": {"CheckID": "db-tcp", "ServiceID": "db", "Status": "critical"}},
    ):
        assert client.put("/v1/catalog/register", content=json.dumps(body).encode()).status_code == 200
    for key, value in (("a", b"1"), ("a/b", b"2"), ("a/b/c", b""), ("fuzz", b"\xff\x00")):
        assert client.put(f"/v1/kv/{key}?flags=7", content=value).status_code == 200
    return log.store


def _client_for(log: LocalLog) -> TestClient:
    api = RegistryAPI(log, ServerInfo("n", "dc1", "127.0.0.1:8500", "127.0.0.1:8300"))
    app = Starlette(routes=api.routes(), exception_handlers={405: method_not_allowed, 404: method_not_allowed})
    return TestClient(app, raise_server_exceptions=True)


SEED = _seed_store()


def make_client(seeded: bool = True) -> tuple[TestClient, LocalLog]:
    """A client over a fresh store: a copy of SEED (copy.deepcopy goes through __getstate__)."""
    log = LocalLog()
    if seeded:
        log.store.replace_with(copy.deepcopy(SEED))
    return _client_for(log), log


def tables_digest(store: StateStore) -> str:
    """Everything replicated except the log position: a rejected command may take an index (Raft
    commits it) but must not change a table. A digest, so a long run compares hashes, not stores."""
    with store.lock:
        data = store.export()
    data.pop("index", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=repr).encode()).hexdigest()


def check_answer(resp: httpx.Response, what: Any) -> None:
    """The API-wide invariant: no 5xx (but Consul's own 500 for an unknown ?dc), every 4xx explained."""
    if resp.status_code == 500 and resp.text.startswith("No path to datacenter"):
        return  # Consul answers an unknown datacenter with 500 too; clients rely on the text
    assert resp.status_code < 500, (what, resp.status_code, resp.text)
    if resp.status_code >= 400 and resp.status_code != 404:
        assert resp.text.strip(), ("errors must say what is wrong", what, resp.status_code)


ENDPOINTS = [("PUT", "/v1/catalog/register"), ("PUT", "/v1/catalog/deregister"), ("PUT", "/v1/txn"),
             ("PUT", "/v1/kv/fuzz"), ("PUT", "/v1/snapshot")]


@fuzz(300)
@given(st.sampled_from(ENDPOINTS), bodies)
@example(("PUT", "/v1/txn"),  # the delete runs before the get: was a KeyError in apply, half-applied
         json.dumps([{"KV": {"Verb": "delete", "Key": "a"}}, {"KV": {"Verb": "get", "Key": "a"}}]).encode())
def test_registry_endpoints_never_500(endpoint: tuple[str, str], body: bytes) -> None:
    method, path = endpoint
    client, log = make_client()
    before = tables_digest(log.store)
    resp = client.request(method, path, content=body)
    check_answer(resp, (path, body))
    if resp.status_code >= 400:  # 409 for a txn whose checks failed, too
        assert tables_digest(log.store) == before, ("a rejected write changed the state", path, body)


@fuzz(100)
@given(structured)
def test_rejected_registration_changes_nothing(body: Any) -> None:
    client, log = make_client()
    before = tables_digest(log.store)
    resp = client.put("/v1/catalog/register", content=json.dumps(body).encode())
    if resp.status_code >= 400:
        assert tables_digest(log.store) == before


@fuzz(300)
@given(st.one_of(json_values, structured))
def test_agent_decoders_only_raise_api_errors(body: Any) -> None:
    for decode in (decode_service_registration, decode_check_registration):
        try:
            decode(json.dumps(body).encode())
        except APIError as exc:
            assert 400 <= exc.status < 500 and exc.message


# -- query strings on the read endpoints --------------------------------------------------------

selectors = st.sampled_from(
    ["Node", "Address", "ServiceName", "ServiceTags", "ServiceMeta.env", "ServicePort", "ServiceProxy",
     "NodeMeta.rack", "Service.Service", "Service.Tags", "Service.Meta.env", "Service.Port", "Service.Weights",
     "Service.Proxy.DestinationServiceName", "Service.Connect.Native", "Checks", "Checks.Status", "Checks.0.Status",
     "Node.Node", "Node.Meta.rack", "Status", "CheckID", "ServiceID", "Key", "Flags", "TaggedAddresses.wan",
     'Service.Meta["env"]', 'Service.Meta."env"', '"/Service/Meta/env"', "1abc", "Service..Tags"]
)
literals = st.sampled_from(["web", "passing", "v1", "prod", "80", "0x50", "-1", "1.5", "true", '"a b"', "``",
                            '"\\u00e9"', '"\\x"', "in", "a"]) | st.text(max_size=8).map(json.dumps)
regexes = st.sampled_from(['"^w"', '".*"', '"["', '"(?P<x>"', '"\\\\d+"', '"a{99999999999}"', "`\\b`"]) | st.text(
    max_size=8).map(json.dumps)
matches = st.one_of(
    st.tuples(selectors, st.sampled_from(["==", "!="]), literals).map(" ".join),
    st.tuples(literals, st.sampled_from(["in", "not in"]), selectors).map(" ".join),
    st.tuples(selectors, st.sampled_from(["contains", "not contains"]), literals).map(" ".join),
    st.tuples(selectors, st.sampled_from(["is empty", "is not empty"])).map(" ".join),
    st.tuples(selectors, st.sampled_from(["matches", "not matches"]), regexes).map(" ".join),
)
filters = st.one_of(
    st.recursive(matches, lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from([" and ", " or ", "and", " or("]), inner).map("".join),
        inner.map(lambda e: f"not {e}"),
        inner.map(lambda e: f"({e})"),
    ), max_leaves=6),
    st.text(max_size=30),
    st.integers(60, 200).map(lambda n: "(" * n + "Node == a" + ")" * n),  # past the nesting limit
)
durations = st.sampled_from(["", "0", "0s", "1ms", "5ms", "1.5ms", ".5ms", "-1s", "+1ms", "1", "10", "1h", "ms",
                             "1e3ms", "9" * 400 + "ns", "1µs", "NaN", "inf"]) | st.text(max_size=6)
indexes = st.sampled_from(["", "0", "1", "2", "-1", "1.5", "0x10", "1_0", " 3", "٣", "9" * 30, "abc"]) | st.integers(
    0, 60).map(str)
QUERY_VALUES: dict[str, st.SearchStrategy[str]] = {
    "index": indexes,
    "wait": durations,
    "filter": filters,
    "dc": st.sampled_from(["", "dc1", "dc2", "DC1"]) | st.text(max_size=5),
    "tag": st.sampled_from(["v1", "primary", "", "nope"]) | st.text(max_size=5),
    "node-meta": st.sampled_from(["rack:a", "rack:", ":", "rack", "rack:a:b", "x:y"]) | st.text(max_size=6),
    "separator": st.sampled_from(["/", "", "//", "a", "b/"]) | st.text(max_size=3),
    "cas": indexes,
    "flags": indexes,
    "recurse": st.sampled_from(["", "true", "false", "maybe"]),
    "keys": st.sampled_from(["", "true", "0"]),
    "raw": st.sampled_from(["", "1"]),
    "passing": st.sampled_from(["", "true", "false", "yes"]),
    "stale": st.sampled_from(["", "true", "false", "x"]),
    "consistent": st.sampled_from(["", "true", "false", "x"]),
    "pretty": st.sampled_from(["", "1"]),
    "peer": st.sampled_from(["", "p"]),
    "near": st.sampled_from(["_agent", "n1"]),
}
query_pairs = st.lists(
    st.sampled_from(sorted(QUERY_VALUES)).flatmap(lambda name: st.tuples(st.just(name), QUERY_VALUES[name]))
    | st.tuples(st.text(max_size=6), st.text(max_size=6)),
    max_size=6,
)
names = st.sampled_from(["web", "db", "web-sidecar-proxy", "n1", "n2", "nope", "", "a", "a/b", "a/", "fuzz"]) | st.text(
    max_size=8)
GET_PATHS = ["/v1/catalog/nodes", "/v1/catalog/services", "/v1/catalog/service/{}", "/v1/catalog/connect/{}",
             "/v1/catalog/node/{}", "/v1/health/service/{}", "/v1/health/connect/{}", "/v1/health/checks/{}",
             "/v1/health/state/{}", "/v1/health/node/{}", "/v1/kv/{}", "/v1/snapshot", "/v1/catalog/datacenters"]
MAX_BLOCK = 0.02  # a blocking query in the fuzz waits at most this long


def bounded_query(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Keep blocking queries short: an ?index at or past the current one waits up to ?wait (300 s default)."""
    out = [(k, v) for k, v in pairs if k != "wait"]
    waits = [v for k, v in pairs if k == "wait"]
    wait = waits[-1] if waits else "1ms"
    try:
        if not wait or parse_duration(wait) > MAX_BLOCK:  # an empty ?wait= means the default 300 s, like Consul
            wait = "1ms"
    except DurationError:
        pass  # an invalid ?wait is a 400 before anything blocks
    return out + [("wait", wait)]


def get_url(path: str, name: str, pairs: list[tuple[str, str]]) -> str:
    url = path.format(quote(name, safe="/"))
    return f"{url}?{urlencode(bounded_query(pairs))}"


READ_CLIENT, READ_LOG = make_client()  # reads don't change the tables: one store for every example


@fuzz(300)
@given(st.sampled_from(GET_PATHS), names, query_pairs)
@example("/v1/health/service/{}", "web", [("filter", "(" * 100 + "Node == a" + ")" * 100)])
@example("/v1/kv/{}", "a", [("keys", ""), ("separator", "/"), ("index", "9" * 30)])
@example("/v1/catalog/nodes", "", [("index", "6"), ("wait", "")])  # blocked 300 s in a long run: harness bug
def test_read_query_strings_never_500(path: str, name: str, pairs: list[tuple[str, str]]) -> None:
    before = tables_digest(READ_LOG.store)
    url = get_url(path, name, pairs)
    start = time.monotonic()
    resp = READ_CLIENT.get(url)
    assert time.monotonic() - start < 5.0, ("a read took too long", url)
    check_answer(resp, url)
    assert tables_digest(READ_LOG.store) == before, ("a read changed the state", url)


@fuzz(200)
@given(st.sampled_from([("PUT", "/v1/kv/{}"), ("DELETE", "/v1/kv/{}")]), names, query_pairs, st.binary(max_size=20))
def test_kv_write_query_strings_never_500(endpoint: tuple[str, str], name: str, pairs: list[tuple[str, str]],
                                          body: bytes) -> None:
    method, path = endpoint
    client, log = make_client()
    before = tables_digest(log.store)
    url = get_url(path, name, pairs)
    resp = client.request(method, url, content=body)
    check_answer(resp, (method, url))
    if resp.status_code >= 400 or resp.text == "false":  # refused, or a failed ?cas: nothing written
        assert tables_digest(log.store) == before, ("a refused write changed the state", method, url)


# -- sequences against one store ------------------------------------------------------------------

NODES = st.sampled_from(["n1", "n2", "n3"])
SERVICE_NAMES = st.sampled_from(["web", "db", "web-sidecar-proxy", "api"])
SERVICE_IDS = st.sampled_from(["web-1", "db", "web-sidecar-proxy", "api", "x"])
KEYS = st.sampled_from(["a", "a/b", "a/b/c", "fuzz", "b", ""])
odd = json_values | st.sampled_from([[], "x", 0, {"DestinationServiceName": "web"}, {"Native": True}])
services = st.fixed_dictionaries(
    {"Service": SERVICE_NAMES},
    optional={"ID": SERVICE_IDS, "Tags": st.lists(st.sampled_from(["v1", "v2", "primary"]), max_size=2),
              "Port": st.integers(-1, 70000), "Meta": st.dictionaries(st.sampled_from(["env", ""]), st.text(max_size=3)),
              "Kind": st.sampled_from(["", "connect-proxy", "mesh-gateway"]), "Proxy": odd, "Connect": odd,
              "Weights": st.fixed_dictionaries({}, optional={"Passing": st.integers(-1, 3), "Warning": st.integers(-1, 3)}),
              "Address": st.sampled_from(["", "10.0.0.9", "0.0.0.0"]),
              "TaggedAddresses": st.dictionaries(st.sampled_from(["lan", "wan"]),
                                                 st.fixed_dictionaries({"Address": st.just("1.1.1.1"), "Port": st.integers(0, 9)}))},
)
checks = st.fixed_dictionaries(
    {"CheckID": st.sampled_from(["c1", "c2", "serfHealth", ""])},
    optional={"ServiceID": SERVICE_IDS, "Status": st.sampled_from(["passing", "warning", "critical", "bad", ""]),
              "Definition": odd, "Node": NODES, "Type": st.sampled_from(["", "http", "ttl"])},
)
registrations = st.fixed_dictionaries(
    {"Node": NODES},
    optional={"Address": st.sampled_from(["10.0.0.1", "10.0.0.2", ""]), "Service": services,
              "Checks": st.lists(checks, max_size=2), "Check": checks, "SkipNodeUpdate": st.booleans(),
              "NodeMeta": st.dictionaries(st.sampled_from(["rack", "zone"]), st.sampled_from(["a", "b"])),
              "TaggedAddresses": st.dictionaries(st.sampled_from(["lan", "wan"]), st.just("1.1.1.1"))},
)
valid_registrations = st.builds(  # mostly accepted, so later steps meet what they stored
    lambda node, name, kind, proxy, connect, status: {
        "Node": node, "Address": "10.0.0.1",
        "Service": {"Service": name, "ID": name, "Kind": kind, "Proxy": proxy, "Connect": connect},
        "Check": {"CheckID": "c1", "ServiceID": name, "Status": status}},
    NODES, SERVICE_NAMES, st.sampled_from(["", "connect-proxy"]), odd, odd,
    st.sampled_from(["passing", "warning", "critical"]),
)
values = st.sampled_from([None, "", "aGk=", "not base64", 5]) | st.binary(max_size=6).map(lambda b: base64.b64encode(b).decode())
txn_ops = st.lists(
    st.fixed_dictionaries(
        {"KV": st.fixed_dictionaries(
            {"Verb": st.sampled_from(sorted(["set", "cas", "get", "get-tree", "check-index", "check-not-exists",
                                             "delete", "delete-tree", "delete-cas", "lock"]))},
            optional={"Key": KEYS, "Value": values, "Index": st.integers(0, 40), "Flags": st.integers(0, 3)})}
    ),
    min_size=1, max_size=5,
)


class RegistrySequences(RuleBasedStateMachine):
    """Sequences of writes and reads against one store: a 500 that needs earlier writes shrinks to
    the shortest sequence that causes it. After every step: no 5xx, rejected writes changed no
    table, and a cached read answers exactly what a fresh build would."""

    def __init__(self) -> None:
        super().__init__()
        self.client, self.log = make_client(seeded=False)
        self.snapshots: list[bytes] = []

    def write(self, method: str, url: str, body: Any, raw: bytes | None = None) -> httpx.Response:
        before = tables_digest(self.log.store)
        content = raw if raw is not None else json.dumps(body).encode()
        resp = self.client.request(method, url, content=content)
        check_answer(resp, (method, url, content))
        if resp.status_code >= 400:
            assert tables_digest(self.log.store) == before, ("a rejected write changed the state", url, content)
        return resp

    @rule(body=registrations)
    def register(self, body: dict[str, Any]) -> None:
        self.write("PUT", "/v1/catalog/register", body)

    @rule(body=valid_registrations)
    def register_mostly_valid(self, body: dict[str, Any]) -> None:
        self.write("PUT", "/v1/catalog/register", body)

    @rule(node=NODES, service_id=st.none() | SERVICE_IDS, check_id=st.none() | st.sampled_from(["c1", "c2", "serfHealth"]))
    def deregister(self, node: str, service_id: str | None, check_id: str | None) -> None:
        body: dict[str, Any] = {"Node": node}
        if service_id:
            body["ServiceID"] = service_id
        if check_id:
            body["CheckID"] = check_id
        self.write("PUT", "/v1/catalog/deregister", body)

    @rule(key=KEYS, value=st.binary(max_size=4), cas=st.none() | st.integers(0, 40), flags=st.none() | st.integers(0, 3))
    def kv_put(self, key: str, value: bytes, cas: int | None, flags: int | None) -> None:
        query = urlencode([(k, v) for k, v in (("cas", cas), ("flags", flags)) if v is not None])
        self.write("PUT", f"/v1/kv/{key}?{query}", None, raw=value)

    @rule(key=KEYS, recurse=st.booleans(), cas=st.none() | st.integers(0, 40))
    def kv_delete(self, key: str, recurse: bool, cas: int | None) -> None:
        query = urlencode([("recurse", "")] * recurse + ([("cas", cas)] if cas is not None else []))
        self.write("DELETE", f"/v1/kv/{key}?{query}", None, raw=b"")

    @rule(ops=txn_ops)
    def txn(self, ops: list[dict[str, Any]]) -> None:
        self.write("PUT", "/v1/txn", ops)

    @rule(key=KEYS.filter(bool), verbs=st.lists(st.sampled_from(["set", "cas", "get", "check-index",
                                                                 "check-not-exists", "delete", "delete-cas",
                                                                 "delete-tree"]), min_size=2, max_size=4))
    def txn_one_key(self, key: str, verbs: list[str]) -> None:
        # Ops on one key, so later ops depend on earlier ones in the same transaction.
        self.write("PUT", "/v1/txn", [{"KV": {"Verb": v, "Key": key, "Value": "aGk="}} for v in verbs])

    @rule()
    def snapshot_save(self) -> None:
        resp = self.client.get("/v1/snapshot")
        check_answer(resp, "GET /v1/snapshot")
        self.snapshots.append(resp.content)

    @rule(data=st.data())
    def snapshot_restore(self, data: st.DataObject) -> None:
        if not self.snapshots:
            return
        saved = json.loads(data.draw(st.sampled_from(self.snapshots)))
        # A snapshot may come from anyone (docs/security.md): sometimes replace one table by junk.
        table = data.draw(st.none() | st.sampled_from(["nodes", "services", "checks", "kv", "meta"]))
        if table is not None:
            saved["State"][table] = data.draw(st.dictionaries(st.sampled_from(["n1", "a", "web"]), odd, max_size=2))
        elif saved["State"]["services"] and data.draw(st.booleans()):  # or one field of one service record
            node = data.draw(st.sampled_from(sorted(saved["State"]["services"])))
            records = saved["State"]["services"][node]
            if records:
                record = records[data.draw(st.sampled_from(sorted(records)))]
                record[data.draw(st.sampled_from(["Tags", "Proxy", "Meta", "ID", "ModifyIndex"]))] = data.draw(odd)
        self.write("PUT", "/v1/snapshot", saved)

    @rule(path=st.sampled_from(GET_PATHS), name=names, pairs=query_pairs)
    def read(self, path: str, name: str, pairs: list[tuple[str, str]]) -> None:
        url = get_url(path, name, pairs)
        resp = self.client.get(url)
        check_answer(resp, url)
        if resp.status_code == 200 and path != "/v1/snapshot":
            # The shared-read cache (registry/views.py) must answer what a fresh build answers.
            with self.log.store.lock:
                self.log.store.read_cache.clear()
            fresh = self.client.get(url)
            assert (fresh.status_code, fresh.content) == (resp.status_code, resp.content), ("stale cached read", url)

    @invariant()
    def every_view_builds(self) -> None:
        # The views behind the watched endpoints must build from whatever the store now holds.
        for url in ("/v1/catalog/services", "/v1/catalog/nodes", "/v1/health/state/any", "/v1/kv/?recurse",
                    "/v1/health/connect/web", "/v1/catalog/connect/web", "/v1/health/service/web"):
            check_answer(self.client.get(url), url)


TestRegistrySequences = RegistrySequences.TestCase
TestRegistrySequences.settings = settings(
    FUZZ, max_examples=_examples(15), stateful_step_count=int(os.environ.get("LICTOR_FUZZ_STEPS") or 25)
)


def test_txn_get_after_delete_fails_whole() -> None:
    """Regression (found by the fuzz): a txn that deletes a key and then reads it answered 500 and left
    the delete applied; the checks must see the earlier ops, like Consul's sequential txn."""
    client, log = make_client()
    before = tables_digest(log.store)
    ops = [{"KV": {"Verb": "delete", "Key": "a"}}, {"KV": {"Verb": "get", "Key": "a"}}]
    resp = client.put("/v1/txn", content=json.dumps(ops).encode())
    assert resp.status_code == 409, resp.text
    assert resp.json()["Errors"][0]["OpIndex"] == 1
    assert tables_digest(log.store) == before
    # and the sequential view works forwards, too: a set then a get in one txn succeeds
    ops = [{"KV": {"Verb": "set", "Key": "new", "Value": "aGk="}}, {"KV": {"Verb": "get", "Key": "new"}}]
    resp = client.put("/v1/txn", content=json.dumps(ops).encode())
    assert resp.status_code == 200, resp.text


def test_non_object_proxy_or_connect_is_refused() -> None:
    """Regression (found by the fuzz): a registration whose Service.Proxy or Service.Connect was not an
    object was stored, and then every /v1/catalog/connect and /v1/health/connect read answered 500."""
    client, log = make_client()
    before = tables_digest(log.store)
    for field, value in (("Proxy", [1]), ("Connect", "x")):
        body = {"Node": "n1", "Address": "10.0.0.1",
                "Service": {"Service": "web", "Kind": "connect-proxy", field: value}}
        resp = client.put("/v1/catalog/register", content=json.dumps(body).encode())
        assert resp.status_code == 400 and field in resp.text, resp.text
    assert tables_digest(log.store) == before
    for url in ("/v1/catalog/connect/web", "/v1/health/connect/web"):
        assert client.get(url).status_code == 200


def test_junk_snapshot_restore_is_refused_whole() -> None:
    """Regression (found by the fuzz): a restore only checked that each table was an object, so
    {"nodes": {"n1": []}} was taken and then every catalog read answered 500 until the next restore."""
    client, log = make_client()
    before = tables_digest(log.store)
    saved = json.loads(client.get("/v1/snapshot").content)
    for table, junk in (("nodes", {"n1": []}), ("services", {"n1": {"web-1": {"Service": "web"}}}),
                        ("kv", {"a": {"Key": "a", "Value": "not base64!"}})):
        state = dict(saved["State"], **{table: junk})
        resp = client.put("/v1/snapshot", content=json.dumps(dict(saved, State=state)).encode())
        assert resp.status_code == 400 and "snapshot" in resp.text, resp.text
    assert tables_digest(log.store) == before
    assert client.put("/v1/snapshot", content=json.dumps(saved).encode()).status_code == 200  # a real one still restores
