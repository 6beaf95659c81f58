"""Hypothesis over JSON bodies: the API answers 2xx or 4xx, never 500, and nothing half-applies.

The registry routes run in-process over the in-memory log (no sockets), so thousands of bodies
take seconds. Agent-side decoders are fuzzed directly.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.testclient import TestClient

from lictor.agent.definitions import decode_check_registration, decode_service_registration
from lictor.errors import APIError
from lictor.httpapi import method_not_allowed
from lictor.registry.http import RegistryAPI, ServerInfo
from lictor.registry.raft import LocalLog


def _examples(default: int) -> int:
    """LICTOR_FUZZ_EXAMPLES=20000 for a long run (docs/fuzzing.md); the small default keeps CI fast."""
    return int(os.environ.get("LICTOR_FUZZ_EXAMPLES") or default)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)
field_names = st.sampled_from(
    ["Node", "Address", "Service", "Check", "Checks", "ID", "Port", "Tags", "Meta", "Status", "ServiceID",
     "CheckID", "name", "port", "TaggedAddresses", "NodeMeta", "SkipNodeUpdate", "Weights", "Definition",
     "Interval", "TTL", "HTTP", "TCP", "Args", "Connect", "SidecarService", "Proxy", "KV", "Verb", "Key", "Value"]
)
structured = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=12) | st.sampled_from(["10s", "1.2.3.4", "passing"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(field_names, children, max_size=6),
    max_leaves=25,
)
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    structured.map(lambda v: json.dumps(v).encode()),
)


def make_client() -> tuple[TestClient, LocalLog]:
    log = LocalLog()
    api = RegistryAPI(log, ServerInfo("n", "dc1", "127.0.0.1:8500", "127.0.0.1:8300"))
    app = Starlette(routes=api.routes(), exception_handlers={405: method_not_allowed, 404: method_not_allowed})
    return TestClient(app, raise_server_exceptions=True), log


CLIENT, LOG = make_client()
ENDPOINTS = [("PUT", "/v1/catalog/register"), ("PUT", "/v1/catalog/deregister"), ("PUT", "/v1/txn"),
             ("PUT", "/v1/kv/fuzz"), ("PUT", "/v1/snapshot")]


@settings(max_examples=_examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ENDPOINTS), bodies)
def test_registry_endpoints_never_500(endpoint: tuple[str, str], body: bytes) -> None:
    method, path = endpoint
    resp = CLIENT.request(method, path, content=body)
    assert resp.status_code < 500, (path, body, resp.status_code, resp.text)
    if resp.status_code >= 400:
        assert resp.text.strip(), "errors must say what is wrong"


@settings(max_examples=_examples(200), deadline=None)
@given(structured)
def test_rejected_registration_changes_nothing(body: Any) -> None:
    with LOG.store.lock:
        before = json.dumps(LOG.store.export(), sort_keys=True)
    resp = CLIENT.put("/v1/catalog/register", content=json.dumps(body).encode())
    if resp.status_code >= 400:
        with LOG.store.lock:
            assert json.dumps(LOG.store.export(), sort_keys=True) == before


@settings(max_examples=_examples(400), deadline=None)
@given(st.one_of(json_values, structured))
def test_agent_decoders_only_raise_api_errors(body: Any) -> None:
    for decode in (decode_service_registration, decode_check_registration):
        try:
            decode(json.dumps(body).encode())
        except APIError as exc:
            assert 400 <= exc.status < 500 and exc.message
