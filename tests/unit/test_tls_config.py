"""-verify-outgoing / -verify-server-hostname (issue #9): flags, config-file keys, startup errors, and
which address of a peer a server calls (lictor/tls.py, ServerAgent.peer_url)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lictor import tls
from lictor.config import ConfigError, parse_agent_args
from lictor.registry.server import ServerAgent


@pytest.fixture
def ca(tmp_path: Path) -> str:
    """A self-signed CA made in process (its key beside it: ca.key), also usable as a cert/key pair here."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    path = tmp_path / "ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ca.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    return str(path)


BASE = ["-data-dir", "/tmp/lictor-unit", "-node", "n1"]


def test_flags_and_scheme_inference(ca: str) -> None:
    config = parse_agent_args(BASE + ["-ca-file", ca, "-verify-outgoing", "-verify-server-hostname",
                                      "-retry-join", "10.0.0.1:8501", "-retry-join", "https://10.0.0.2:8501/"])
    assert config.verify_outgoing and config.verify_server_hostname
    assert tls.default_scheme(config) == "https"
    assert [tls.join_url(a, config) for a in config.retry_join] == ["https://10.0.0.1:8501", "https://10.0.0.2:8501"]
    assert tls.server_name(config) == "server.dc1.consul"
    plain = parse_agent_args(BASE + ["-retry-join", "10.0.0.1:8500"])
    assert not plain.verify_outgoing and tls.join_url("10.0.0.1:8500", plain) == "http://10.0.0.1:8500"


def test_config_file_keys(tmp_path: Path, ca: str) -> None:
    path = tmp_path / "tls.json"
    path.write_text(json.dumps({"ca_file": ca, "verify_outgoing": True, "verify_server_hostname": True,
                                "datacenter": "east", "domain": "lictor"}))
    config = parse_agent_args(BASE + ["-config-file", str(path)])
    assert config.verify_outgoing and config.verify_server_hostname
    assert tls.server_name(config) == "server.east.lictor"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-verify-outgoing"], "-verify-outgoing needs -ca-file"),
        (["-verify-server-hostname"], "-verify-server-hostname needs -verify-outgoing"),
        (["-ca-file", "{ca}", "-verify-outgoing", "-retry-join", "http://10.0.0.1:8500"], "forbids plain HTTP"),
        (["-ca-file", "{ca}", "-verify-outgoing", "-server", "-encrypt", "k"], "needs -https-port"),
        (["-ca-file", "/nonexistent/ca.pem"], "cannot load the TLS files"),
        (["-client-cert", "{ca}"], "-client-cert and -client-key go together"),
    ],
)
def test_startup_errors(extra: list[str], message: str, ca: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_agent_args(BASE + [a.replace("{ca}", ca) for a in extra])


def test_peer_url_follows_the_policy(ca: str) -> None:
    both = {"RaftAddr": "10.0.0.2:8300", "HTTPAddr": "10.0.0.2:8500", "HTTPSAddr": "10.0.0.2:8501"}
    https_only = {"RaftAddr": "10.0.0.3:8300", "HTTPSAddr": "10.0.0.3:8501"}
    http_only = {"RaftAddr": "10.0.0.4:8300", "HTTPAddr": "10.0.0.4:8500"}
    lax = ServerAgent(parse_agent_args(BASE + ["-server", "-encrypt", "k"]))
    # Without -verify-outgoing: plain HTTP where a peer has it (as before), HTTPS where it has only that.
    assert [lax.peer_url(r) for r in (both, https_only, http_only)] == [
        "http://10.0.0.2:8500", "https://10.0.0.3:8501", "http://10.0.0.4:8500"]
    key = ca.replace("ca.pem", "ca.key")
    strict = ServerAgent(parse_agent_args(BASE + ["-server", "-encrypt", "k", "-http-port", "-1", "-https-port", "8501",
                                                  "-cert-file", ca, "-key-file", key, "-ca-file", ca, "-verify-outgoing"]))
    # With it: HTTPS or nothing.
    assert [strict.peer_url(r) for r in (both, https_only, http_only)] == [
        "https://10.0.0.2:8501", "https://10.0.0.3:8501", None]
    assert strict.self_record() == {"Node": "n1", "RaftAddr": "127.0.0.1:8300", "HTTPAddr": "", "HTTPSAddr": "127.0.0.1:8501"}
