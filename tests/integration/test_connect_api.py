"""Connect and config entries against a real `lictor agent -dev`, driven by py-consul and httpx.

Covers the built-in CA (roots, leaves whose URI SAN is the service's SPIFFE ID, verified with the
real `openssl verify`), rotation that keeps old leaves valid through cross-signing, server-side CSR
signing, intentions (exact, legacy, match, check, authorize, blocking), `/v1/config` with CAS, the
`service-intentions` kind staying in step with intentions, and bad input refused with a 400 that
names the problem while nothing is stored.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import consul
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from procs import AgentProc, free_ports, running_dev_agent

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl binary")


def client(agent: AgentProc) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=agent.http_port, connections_timeout=30)


def uri_sans(pem: str) -> list[str]:
    cert = x509.load_pem_x509_certificates(pem.encode())[0]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def split_pem(pem: str) -> list[str]:
    marker = "-----BEGIN CERTIFICATE-----"
    return [marker + part for part in pem.split(marker)[1:]]


def openssl_verify(tmp: Path, ca_pems: list[str], leaf_pem: str, untrusted: list[str] = ()) -> subprocess.CompletedProcess:
    (tmp / "ca.pem").write_text("".join(ca_pems))
    (tmp / "leaf.pem").write_text(leaf_pem)
    cmd = ["openssl", "verify", "-CAfile", str(tmp / "ca.pem")]
    if untrusted:
        (tmp / "untrusted.pem").write_text("".join(untrusted))
        cmd += ["-untrusted", str(tmp / "untrusted.pem")]
    return subprocess.run([*cmd, str(tmp / "leaf.pem")], capture_output=True, text=True, timeout=30)


def csr_for(uri: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "svc")]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def blocking_get(url: str, out: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        started = time.monotonic()
        out["response"] = httpx.get(url, timeout=60)
        out["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(0.3)  # let the request reach the server and start blocking
    return thread


# -- CA and leaves -----------------------------------------------------------------------------------------


def test_roots_and_leaf_identity_verify_with_openssl(dev_agent: AgentProc, tmp_path: Path) -> None:
    c = client(dev_agent)
    roots = c.connect.ca.roots()
    assert roots["TrustDomain"].endswith(".consul") and len(roots["TrustDomain"]) == len("x" * 36 + ".consul")
    assert [r["Active"] for r in roots["Roots"]] == [True]
    assert roots["Roots"][0]["ID"] == roots["ActiveRootID"]
    assert "PrivateKey" not in roots["Roots"][0]
    assert c.agent.connect.ca.roots()["ActiveRootID"] == roots["ActiveRootID"]
    pem = dev_agent.get("/v1/connect/ca/roots?pem=true")
    assert pem.status_code == 200 and pem.headers["content-type"].startswith("application/pem-certificate-chain")
    assert pem.text.strip() == roots["Roots"][0]["RootCert"].strip()

    leaf = c.agent.connect.ca.leaf("web")
    td = roots["TrustDomain"]
    assert leaf["Service"] == "web"
    assert leaf["ServiceURI"] == f"spiffe://{td}/ns/default/dc/dc1/svc/web"
    assert uri_sans(leaf["CertPEM"]) == [leaf["ServiceURI"]]
    assert "PRIVATE KEY" in leaf["PrivateKeyPEM"]
    result = openssl_verify(tmp_path, [r["RootCert"] for r in roots["Roots"]], leaf["CertPEM"])
    assert result.returncode == 0, result.stdout + result.stderr

    # Cached: the same certificate until renewal; X-Consul-Index is its ModifyIndex.
    resp = dev_agent.get("/v1/agent/connect/ca/leaf/web")
    assert resp.json()["SerialNumber"] == leaf["SerialNumber"]
    assert resp.headers["X-Consul-Index"] == str(leaf["ModifyIndex"])

    config = c.connect.ca.configuration()
    assert config["Provider"] == "consul"
    assert config["Config"]["LeafCertTTL"] == "72h" and config["Config"]["PrivateKeyType"] == "ec"


def test_rotation_keeps_old_leaves_valid_and_wakes_leaf_watchers(dev_agent: AgentProc, tmp_path: Path) -> None:
    c = client(dev_agent)
    old_roots = c.connect.ca.roots()
    old_leaf_resp = dev_agent.get("/v1/agent/connect/ca/leaf/web")
    old_leaf = old_leaf_resp.json()
    index = old_leaf_resp.headers["X-Consul-Index"]

    watch: dict[str, Any] = {}
    thread = blocking_get(f"{dev_agent.url}/v1/agent/connect/ca/leaf/web?index={index}&wait=30s", watch)
    assert c.connect.ca.update_configuration("consul", {"PrivateKeyType": "rsa", "PrivateKeyBits": 2048})
    thread.join(20)
    woke = watch["response"]
    assert woke.status_code == 200 and watch["elapsed"] < 15
    assert int(woke.headers["X-Consul-Index"]) > int(index)
    new_leaf = woke.json()
    assert new_leaf["SerialNumber"] != old_leaf["SerialNumber"]

    roots = c.connect.ca.roots()
    assert roots["TrustDomain"] == old_roots["TrustDomain"]
    assert len(roots["Roots"]) == 2
    old_root = next(r for r in roots["Roots"] if r["ID"] == old_roots["ActiveRootID"])
    new_root = next(r for r in roots["Roots"] if r["ID"] == roots["ActiveRootID"])
    assert old_root["Active"] is False and new_root["Active"] is True
    assert new_root["PrivateKeyType"] == "rsa" and new_root["PrivateKeyBits"] == 2048
    assert len(new_root["IntermediateCerts"]) == 1  # cross-signed by the old root
    bundle = [r["RootCert"] for r in roots["Roots"]]

    # The old leaf still validates against the published roots.
    result = openssl_verify(tmp_path, bundle, old_leaf["CertPEM"])
    assert result.returncode == 0, result.stdout + result.stderr
    # A new leaf validates for a peer that only trusts the old root, through the cross-signed cert...
    leaf_cert, *chain = split_pem(new_leaf["CertPEM"])
    assert chain == new_root["IntermediateCerts"]
    result = openssl_verify(tmp_path, [old_root["RootCert"]], leaf_cert, untrusted=chain)
    assert result.returncode == 0, result.stdout + result.stderr
    # ...and directly against the new root, but not against the old root without the chain.
    assert openssl_verify(tmp_path, [new_root["RootCert"]], leaf_cert).returncode == 0
    assert openssl_verify(tmp_path, [old_root["RootCert"]], leaf_cert).returncode != 0

    assert c.connect.ca.configuration()["Config"]["PrivateKeyType"] == "rsa"
    # Changing only a TTL does not rotate.
    assert c.connect.ca.update_configuration("consul", {"LeafCertTTL": "24h"})
    again = c.connect.ca.roots()
    assert again["ActiveRootID"] == roots["ActiveRootID"] and len(again["Roots"]) == 2
    assert c.connect.ca.configuration()["Config"]["LeafCertTTL"] == "24h"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"PrivateKeyType": "dsa"}, "PrivateKeyType"),
        ({"PrivateKeyType": "ec", "PrivateKeyBits": 512}, "PrivateKeyBits"),
        ({"LeafCertTTL": "forever"}, "LeafCertTTL"),
        ({"LeafCertTTL": "10m"}, "LeafCertTTL must be at least 1h"),
        ({"Bogus": 1}, "Bogus"),
        ({"RootCert": "not a pem"}, "PrivateKey and Config.RootCert must be supplied together"),
    ],
)
def test_bad_ca_configuration_is_rejected(dev_agent: AgentProc, config: dict[str, Any], message: str) -> None:
    before = dev_agent.get("/v1/connect/ca/configuration").json()
    resp = dev_agent.put("/v1/connect/ca/configuration", json={"Provider": "consul", "Config": config})
    assert resp.status_code == 400 and message in resp.text, resp.text
    after = dev_agent.get("/v1/connect/ca/configuration").json()
    assert after["Config"] == before["Config"]
    assert dev_agent.put("/v1/connect/ca/configuration", json={"Provider": "vault", "Config": {}}).status_code == 400


def test_supplied_root_rotates_with_cross_signing(dev_agent: AgentProc, tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from lictor.registry.ca import generate_root

    c = client(dev_agent)
    td = c.connect.ca.roots()["TrustDomain"]
    mine = generate_root(td, now=datetime.now(UTC))
    resp = dev_agent.put("/v1/connect/ca/configuration", json={
        "Provider": "consul", "Config": {"PrivateKey": mine.PrivateKey, "RootCert": mine.RootCert}})
    assert resp.status_code == 200, resp.text
    roots = c.connect.ca.roots()
    assert roots["ActiveRootID"] == mine.ID and len(roots["Roots"]) == 2
    leaf = c.agent.connect.ca.leaf("api")
    assert openssl_verify(tmp_path, [mine.RootCert], split_pem(leaf["CertPEM"])[0]).returncode == 0


def test_server_signs_csrs_only_for_the_named_service(dev_agent: AgentProc, tmp_path: Path) -> None:
    roots = client(dev_agent).connect.ca.roots()
    td = roots["TrustDomain"]
    uri = f"spiffe://{td}/ns/default/dc/dc1/svc/web"
    resp = httpx.post(f"{dev_agent.url}/v1/internal/connect/sign", json={"Service": "web", "CSR": csr_for(uri)})
    assert resp.status_code == 200, resp.text
    leaf = resp.json()
    assert leaf["ServiceURI"] == uri and uri_sans(leaf["CertPEM"]) == [uri]
    assert "PrivateKeyPEM" not in leaf
    assert openssl_verify(tmp_path, [r["RootCert"] for r in roots["Roots"]], leaf["CertPEM"]).returncode == 0

    other = f"spiffe://{td}/ns/default/dc/dc1/svc/db"
    resp = httpx.post(f"{dev_agent.url}/v1/internal/connect/sign", json={"Service": "web", "CSR": csr_for(other)})
    assert resp.status_code == 400 and "does not match requested service" in resp.text

    generated = httpx.post(f"{dev_agent.url}/v1/internal/connect/sign", json={"Service": "db"}).json()
    assert "PRIVATE KEY" in generated["PrivateKeyPEM"] and generated["Service"] == "db"
    assert httpx.post(f"{dev_agent.url}/v1/internal/connect/sign", json={}).status_code == 400


# -- intentions ----------------------------------------------------------------------------------------------


def test_intentions_crud_check_match_authorize(dev_agent: AgentProc) -> None:
    c = client(dev_agent)
    td = c.connect.ca.roots()["TrustDomain"]
    assert c.connect.intentions.read("web", "db") is None
    assert c.connect.intentions.upsert("web", "db", action="allow", description="web may call db")
    assert c.connect.intentions.upsert("*", "db", action="deny")
    got = c.connect.intentions.read("web", "db")
    assert got["Action"] == "allow" and got["Precedence"] == 9 and got["Description"] == "web may call db"
    assert got["CreatedAt"].endswith("Z") and got["CreateIndex"] <= got["ModifyIndex"]

    assert c.connect.intentions.check("web", "db") is True
    assert c.connect.intentions.check("api", "db") is False
    assert c.connect.intentions.check("api", "cache") is True  # default policy: allow
    matched = c.connect.intentions.match("destination", "db")
    assert [(i["SourceName"], i["Precedence"]) for i in matched["db"]] == [("web", 9), ("*", 8)]
    assert [i["DestinationName"] for i in c.connect.intentions.list(filter_expr='SourceName == "*"')] == ["db"]

    auth = c.agent.connect.authorize("db", f"spiffe://{td}/ns/default/dc/dc1/svc/web", "01:02")
    assert auth["Authorized"] is True and auth["Reason"].startswith("Matched L4 intention: ALLOW default/web")
    auth = c.agent.connect.authorize("db", f"spiffe://{td}/ns/default/dc/dc1/svc/api", "01:02")
    assert auth["Authorized"] is False and "DENY default/* => default/db" in auth["Reason"]
    posted = httpx.post(f"{dev_agent.url}/v1/agent/connect/authorize",
                        json={"Target": "cache", "ClientCertURI": "spiffe://other.consul/ns/default/dc/dc1/svc/x"})
    assert posted.json() == {"Authorized": True, "Reason": "Default behavior configured by ACLs"}

    # An L7 intention counts as deny for connection-level checks.
    perms = [{"Action": "allow", "HTTP": {"PathPrefix": "/api", "Methods": ["GET"]}}]
    assert c.connect.intentions.upsert("web", "db", permissions=perms)
    auth = c.agent.connect.authorize("db", f"spiffe://{td}/ns/default/dc/dc1/svc/web", "01:02")
    assert auth["Authorized"] is False and auth["Reason"].startswith("Matched L7 intention")
    assert c.connect.intentions.read("web", "db")["Permissions"] == perms

    assert c.connect.intentions.delete("web", "db")
    assert c.connect.intentions.read("web", "db") is None
    assert [i["SourceName"] for i in c.connect.intentions.list()] == ["*"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"Action": "maybe"}, "Action must be set to 'allow' or 'deny'"),
        ({"Action": "allow", "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/x"}}]}, "mutually exclusive"),
        ({"Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "no-slash"}}]}, "doesn't start with '/'"),
        ({"Permissions": [{"Action": "allow", "HTTP": {"Header": [{"Name": "x", "Exact": "a", "Regex": "b"}]}}]},
         "only contain one of"),
        ({"Permissions": [{"Action": "sometimes", "HTTP": {"PathExact": "/x"}}]}, "Action must be set"),
        ({"Action": "allow", "Bogus": True}, 'unknown field "Bogus"'),
    ],
)
def test_bad_intentions_are_rejected_and_not_stored(dev_agent: AgentProc, body: dict[str, Any], message: str) -> None:
    resp = dev_agent.put("/v1/connect/intentions/exact?source=web&destination=db", json=body)
    assert resp.status_code == 400 and message in resp.text, resp.text
    assert dev_agent.get("/v1/connect/intentions/exact?source=web&destination=db").status_code == 404
    assert dev_agent.get("/v1/connect/intentions").json() == []


def test_intention_input_errors(dev_agent: AgentProc) -> None:
    assert dev_agent.get("/v1/connect/intentions/check?source=web").status_code == 400
    assert "by" in dev_agent.get("/v1/connect/intentions/match?name=web").text
    resp = httpx.post(f"{dev_agent.url}/v1/agent/connect/authorize", json={"ClientCertURI": "spiffe://x/ns/a"})
    assert resp.status_code == 400 and resp.text == "Target service must be specified"
    resp = httpx.post(f"{dev_agent.url}/v1/agent/connect/authorize", json={"Target": "db", "ClientCertURI": "http://x"})
    assert resp.status_code == 400 and resp.text == "ClientCertURI not a valid Connect identifier"
    resp = httpx.post(f"{dev_agent.url}/v1/agent/connect/authorize",
                      json={"Target": "db", "ClientCertURI": "spiffe://td.consul/agent/client/dc/dc1/id/x"})
    assert resp.status_code == 400 and "not a valid Service identifier" in resp.text


def test_blocking_intention_list_wakes_on_change(dev_agent: AgentProc) -> None:
    first = dev_agent.get("/v1/connect/intentions")
    index = int(first.headers["X-Consul-Index"])
    watch: dict[str, Any] = {}
    thread = blocking_get(f"{dev_agent.url}/v1/connect/intentions?index={index}&wait=30s", watch)
    assert client(dev_agent).connect.intentions.upsert("web", "db", action="allow")
    thread.join(20)
    resp = watch["response"]
    assert watch["elapsed"] < 10 and int(resp.headers["X-Consul-Index"]) > index
    assert [i["SourceName"] for i in resp.json()] == ["web"]


def test_legacy_intention_ids(dev_agent: AgentProc) -> None:
    resp = httpx.post(f"{dev_agent.url}/v1/connect/intentions",
                      json={"SourceName": "web", "DestinationName": "db", "SourceType": "consul", "Action": "allow",
                            "Meta": {"team": "a"}})
    assert resp.status_code == 200, resp.text
    ixn_id = resp.json()["ID"]
    assert len(ixn_id) == 36
    dup = httpx.post(f"{dev_agent.url}/v1/connect/intentions",
                     json={"SourceName": "web", "DestinationName": "db", "Action": "deny"})
    assert dup.status_code == 400 and "duplicate intention" in dup.text
    got = dev_agent.get(f"/v1/connect/intentions/{ixn_id}").json()
    assert got["ID"] == ixn_id and got["Meta"] == {"team": "a"}
    assert dev_agent.put(f"/v1/connect/intentions/{ixn_id}", json={"Action": "deny"}).status_code == 200
    got = dev_agent.get(f"/v1/connect/intentions/{ixn_id}").json()
    assert got["Action"] == "deny" and got["ID"] == ixn_id
    assert client(dev_agent).connect.intentions.read("web", "db")["ID"] == ixn_id
    entry = client(dev_agent).config.get("service-intentions", "db")
    assert entry["Sources"][0]["LegacyID"] == ixn_id
    assert httpx.delete(f"{dev_agent.url}/v1/connect/intentions/{ixn_id}").status_code == 200
    assert dev_agent.get(f"/v1/connect/intentions/{ixn_id}").status_code == 404


def test_default_intention_policy_deny(tmp_path: Path) -> None:
    http_port, dns_port = free_ports(2)
    agent = AgentProc("deny", http_port, ["-dev", "-node", "deny", "-http-port", str(http_port), "-dns-port",
                                          str(dns_port), "-default-intention-policy", "deny"], tmp_path / "deny.log")
    agent.start()
    try:
        agent.wait_ready()
        c = client(agent)
        assert c.connect.intentions.check("web", "db") is False
        td = c.connect.ca.roots()["TrustDomain"]
        auth = c.agent.connect.authorize("db", f"spiffe://{td}/ns/default/dc/dc1/svc/web", "01")
        assert auth == {"Authorized": False, "Reason": "Default behavior configured by ACLs"}
        assert c.connect.intentions.upsert("web", "db", action="allow")
        assert c.connect.intentions.check("web", "db") is True
    finally:
        agent.kill()


# -- config entries ------------------------------------------------------------------------------------------


def test_config_entries_crud_with_cas(dev_agent: AgentProc) -> None:
    c = client(dev_agent)
    assert c.config.get("service-defaults", "web") is None
    assert c.config.set("service-defaults", "web", {"Protocol": "http"}, cas=0) is True
    assert c.config.set("service-defaults", "web", {"Protocol": "grpc"}, cas=0) is False  # exists
    entry = c.config.get("service-defaults", "web")
    assert entry["Kind"] == "service-defaults" and entry["Protocol"] == "http"
    assert c.config.set("service-defaults", "web", {"Protocol": "http2"}, cas=entry["ModifyIndex"] + 1000) is False
    assert c.config.set("service-defaults", "web", {"Protocol": "http2"}, cas=entry["ModifyIndex"]) is True
    updated = c.config.get("service-defaults", "web")
    assert updated["Protocol"] == "http2" and updated["CreateIndex"] == entry["CreateIndex"]
    assert c.config.set("service-defaults", "api", {"protocol": "grpc"})
    assert [e["Name"] for e in c.config.list("service-defaults")] == ["api", "web"]
    assert [e["Name"] for e in c.config.list("service-defaults", filter_expr='Protocol == "grpc"')] == ["api"]

    resp = httpx.delete(f"{dev_agent.url}/v1/config/service-defaults/api?cas={updated['ModifyIndex']}")
    assert resp.json() is False
    resp = httpx.delete(f"{dev_agent.url}/v1/config/service-defaults/web?cas={updated['ModifyIndex']}")
    assert resp.json() is True
    resp = httpx.delete(f"{dev_agent.url}/v1/config/service-defaults/api")
    assert resp.status_code == 200 and resp.json() == {}
    assert c.config.list("service-defaults") == []
    missing = dev_agent.get("/v1/config/service-defaults/web")
    assert missing.status_code == 404 and "X-Consul-Index" in missing.headers
    assert dev_agent.get("/v1/config/bogus-kind").status_code == 400

    assert c.config.set("proxy-defaults", "global", {"Config": {"protocol": "http"}})
    assert c.config.get("proxy-defaults", "global")["Config"] == {"protocol": "http"}
    assert c.config.set("mesh", "mesh", {"TransparentProxy": {"MeshDestinationsOnly": True}})


def test_discovery_chain_entries_and_graph_rules(dev_agent: AgentProc) -> None:
    c = client(dev_agent)
    assert c.config.set("service-defaults", "web", {"Protocol": "http"})
    assert c.config.set("service-resolver", "web", {"Subsets": {"v1": {"Filter": "Service.Meta.version == v1"},
                                                                "v2": {"Filter": "Service.Meta.version == v2"}}})
    assert c.config.set("service-splitter", "web", {"Splits": [{"Weight": 90, "ServiceSubset": "v1"},
                                                               {"Weight": 10, "ServiceSubset": "v2"}]})
    assert c.config.set("service-router", "web", {"Routes": [
        {"Match": {"HTTP": {"PathPrefix": "/beta"}}, "Destination": {"ServiceSubset": "v2"}}]})
    assert c.config.set("ingress-gateway", "gw", {"Listeners": [
        {"Port": 8080, "Protocol": "http", "Services": [{"Name": "web"}]}]})

    def refused(path: str, body: dict[str, Any] | None, message: str, method: str = "PUT") -> None:
        resp = httpx.request(method, f"{dev_agent.url}{path}", json=body, timeout=10)
        assert resp.status_code == 400, resp.text
        assert message in resp.text, resp.text

    # Changing or deleting an entry must not break the others.
    refused("/v1/config", {"Kind": "service-defaults", "Name": "web", "Protocol": "tcp"},
            "does not permit advanced routing or splitting behavior")
    refused("/v1/config/service-defaults/web", None, "does not permit advanced routing", method="DELETE")
    refused("/v1/config/service-resolver/web", None, 'does not have a subset named "v1"', method="DELETE")
    assert c.config.get("service-defaults", "web")["Protocol"] == "http"
    assert c.config.get("service-resolver", "web") is not None
    # Removing the things that depend on them first makes it legal.
    for kind, name in (("service-router", "web"), ("service-splitter", "web"), ("ingress-gateway", "gw")):
        assert httpx.delete(f"{dev_agent.url}/v1/config/{kind}/{name}").status_code == 200
    assert c.config.set("service-defaults", "web", {"Protocol": "tcp"})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": 60}, {"Weight": 30, "Service": "b"}]},
         "the sum of all split weights must be 100, not 90.00"),
        ({"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": 50, "ServiceSubset": "v1"},
                                                                {"Weight": 50, "ServiceSubset": "v9"}]},
         'does not have a subset named "v9"'),
        ({"Kind": "service-router", "Name": "db", "Routes": [{"Match": {"HTTP": {"PathPrefix": "/x"}}}]},
         '"db" uses a protocol "tcp" that does not permit advanced routing'),
        ({"Kind": "service-resolver", "Name": "b", "Redirect": {"Service": "a"}},
         "detected circular resolver redirect: a -> b -> a"),
        ({"Kind": "ingress-gateway", "Name": "gw", "Listeners": [{"Port": 9000, "Protocol": "tcp",
                                                                  "Services": [{"Name": "x"}, {"Name": "y"}]}]},
         "multiple services per listener"),
        ({"Kind": "service-defaults", "Name": "web", "Protocol": "smtp"}, "invalid protocol 'smtp'"),
        ({"Kind": "service-resolver", "Name": "web", "ConnectTimeout": "5 secs"}, "ConnectTimeout: invalid duration"),
        ({"Kind": "proxy-defaults", "Name": "local"}, 'only "global" is supported'),
        ({"Kind": "service-defaults", "Name": "web", "Surprise": 1}, 'unknown field "Surprise"'),
        ({"Kind": "service-intentions", "Name": "db", "Sources": [{"Name": "web", "Action": "perhaps"}]},
         "Action must be set to 'allow' or 'deny'"),
    ],
)
def test_bad_config_entries_are_rejected_and_not_stored(dev_agent: AgentProc, body: dict[str, Any], message: str) -> None:
    c = client(dev_agent)
    assert c.config.set("service-defaults", "web", {"Protocol": "http"})
    assert c.config.set("service-resolver", "web", {"Subsets": {"v1": {}}})
    assert c.config.set("service-resolver", "a", {"Redirect": {"Service": "b"}})
    before = {kind: c.config.list(kind) for kind in ("service-defaults", "service-resolver", "service-splitter",
                                                     "service-router", "ingress-gateway", "proxy-defaults",
                                                     "service-intentions")}
    resp = dev_agent.put("/v1/config", json=body)
    assert resp.status_code == 400 and message in resp.text, resp.text
    after = {kind: c.config.list(kind) for kind in before}
    assert after == before


def test_service_intentions_entry_and_intentions_stay_in_step(dev_agent: AgentProc) -> None:
    c = client(dev_agent)
    assert c.connect.intentions.upsert("legacy-src", "db", action="allow")
    entry = {"Sources": [{"Name": "web", "Action": "allow"}, {"Name": "*", "Action": "deny"},
                         {"Name": "admin", "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/admin"}}]}]}
    assert c.config.set("service-intentions", "db", entry)
    # The entry replaced db's intentions: legacy-src is gone.
    listed = c.connect.intentions.list()
    assert sorted(i["SourceName"] for i in listed) == ["*", "admin", "web"]
    assert c.connect.intentions.check("web", "db") is True
    assert c.connect.intentions.check("other", "db") is False

    # And intentions written one at a time show up in the entry.
    assert c.connect.intentions.upsert("api", "db", action="allow")
    got = c.config.get("service-intentions", "db")
    assert [s["Name"] for s in got["Sources"]] == ["admin", "api", "web", "*"]
    assert [s["Precedence"] for s in got["Sources"]] == [9, 9, 9, 8]
    assert [e["Name"] for e in c.config.list("service-intentions")] == ["db"]

    # CAS on the derived entry, then delete it entirely.
    assert c.config.set("service-intentions", "db", {"Sources": []}, cas=got["ModifyIndex"] - 1) is False
    resp = httpx.delete(f"{dev_agent.url}/v1/config/service-intentions/db?cas={got['ModifyIndex']}")
    assert resp.json() is True
    assert c.connect.intentions.list() == []
    assert c.config.get("service-intentions", "db") is None


@pytest.fixture
def fast_leaf_agent(tmp_path: Path) -> Iterator[AgentProc]:
    with running_dev_agent(tmp_path, "leafy", "-leaf-cert-ttl", "2h", node="leafy") as agent:
        yield agent


def test_leaf_ttl_comes_from_agent_config(fast_leaf_agent: AgentProc) -> None:
    from datetime import datetime

    c = client(fast_leaf_agent)
    assert c.connect.ca.configuration()["Config"]["LeafCertTTL"] == "2h"
    leaf = c.agent.connect.ca.leaf("web")
    after = datetime.fromisoformat(leaf["ValidAfter"].replace("Z", "+00:00"))
    before = datetime.fromisoformat(leaf["ValidBefore"].replace("Z", "+00:00"))
    assert 2 * 3600 <= (before - after).total_seconds() <= 2 * 3600 + 120


@pytest.mark.slow
def test_cluster_bootstraps_one_ca_and_any_server_serves_connect(cluster, tmp_path: Path) -> None:  # noqa: ANN001
    from procs import wait_until

    def roots_everywhere() -> set[str]:
        ids = {client(s).connect.ca.roots()["ActiveRootID"] for s in cluster.servers}
        return ids if len(ids) == 1 and "" not in ids else set()

    (active,) = wait_until(roots_everywhere, 30, 0.2, "one CA root on every server")
    leader = cluster.leader_proc()
    follower = next(s for s in cluster.servers if s is not leader)
    roots = client(follower).connect.ca.roots()
    assert roots["ActiveRootID"] == active and len(roots["Roots"]) == 1
    leaf = client(follower).agent.connect.ca.leaf("web")
    assert openssl_verify(tmp_path, [r["RootCert"] for r in roots["Roots"]], leaf["CertPEM"]).returncode == 0
    # Writes through a follower land in the replicated state and are visible on the leader.
    assert client(follower).connect.intentions.upsert("web", "db", action="deny")
    assert client(follower).config.set("service-defaults", "web", {"Protocol": "http"})
    wait_until(lambda: client(leader).connect.intentions.read("web", "db") is not None, 10, 0.1, "intention")
    assert client(leader).connect.intentions.check("web", "db") is False
    assert client(leader).config.get("service-defaults", "web")["Protocol"] == "http"
