"""Built-in CA: root properties, leaves accepted by OpenSSL and Python's ssl (mTLS), cross-signed
rotation, CSR identity checks."""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lictor.errors import BadRequest
from lictor.registry.ca import (
    ROOT_NAME,
    cross_sign,
    generate_root,
    root_from_pem,
    sign_leaf,
    verify_leaf,
)

TD = "7f42f496-fbc7-8692-05ed-334aa5340c1e.consul"
NOW = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)
COLON_HEX = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2})*$")
HAVE_OPENSSL = shutil.which("openssl") is not None


@pytest.fixture(scope="module")
def root():
    return generate_root(TD, now=NOW)


def _cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def _ext(cert: x509.Certificate, cls):
    return cert.extensions.get_extension_for_class(cls)


# -------------------------------------------------------------------------------------- root

def test_root_properties(root) -> None:
    cert = _cert(root.RootCert)
    assert root.Name == ROOT_NAME == "Lictor CA Root Cert"
    assert COLON_HEX.match(root.ID) and len(root.ID.split(":")) == 20
    assert COLON_HEX.match(root.SigningKeyID)
    assert root.SigningKeyID == ":".join(f"{b:02x}" for b in _ext(cert, x509.SubjectKeyIdentifier).value.digest)
    assert root.SerialNumber == cert.serial_number
    assert (root.PrivateKeyType, root.PrivateKeyBits) == ("ec", 256)
    assert root.IntermediateCerts == []
    assert root.NotBefore == "2026-05-01T11:59:00Z"
    assert root.NotAfter == (NOW + timedelta(days=3650)).strftime("%Y-%m-%dT%H:%M:%SZ")
    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 1
    ku = _ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}"]
    assert cert.subject == cert.issuer
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert "PrivateKey" not in root.to_api() and root.to_api()["RootCert"] == root.RootCert
    assert "BEGIN EC PRIVATE KEY" in root.PrivateKey


def test_rsa_root_and_leaf() -> None:
    r = generate_root(TD, "rsa", 2048, now=NOW, ttl_days=30)
    assert (r.PrivateKeyType, r.PrivateKeyBits) == ("rsa", 2048)
    assert isinstance(_cert(r.RootCert).public_key(), rsa.RSAPublicKey)
    leaf = sign_leaf(r, "web", TD, "dc1", NOW, 3600)
    assert verify_leaf(leaf.CertPEM, [r.RootCert], NOW).endswith("/svc/web")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [({"key_type": "dsa"}, "PrivateKeyType"), ({"key_type": "ec", "key_bits": 2048}, "PrivateKeyBits"),
     ({"key_type": "rsa", "key_bits": 256}, "PrivateKeyBits"), ({"ttl_days": 0}, "ttl_days")],
)
def test_root_parameter_errors(kwargs: dict, fragment: str) -> None:
    with pytest.raises(BadRequest, match=fragment):
        generate_root(TD, now=NOW, **kwargs)
    with pytest.raises(BadRequest, match="trust domain"):
        generate_root("spiffe://x", now=NOW)


def test_root_from_pem_round_trip(root) -> None:
    again = root_from_pem(root.RootCert, root.PrivateKey, TD)
    assert (again.ID, again.SigningKeyID, again.SerialNumber) == (root.ID, root.SigningKeyID, root.SerialNumber)
    other = generate_root(TD, now=NOW)
    with pytest.raises(BadRequest, match="does not match"):
        root_from_pem(root.RootCert, other.PrivateKey, TD)


# -------------------------------------------------------------------------------------- leaf

def test_leaf_properties(root) -> None:
    leaf = sign_leaf(root, "web", TD, "dc1", NOW, 72 * 3600)
    cert = _cert(leaf.CertPEM)
    assert leaf.ServiceURI == f"spiffe://{TD}/ns/default/dc/dc1/svc/web"
    assert leaf.Service == "web"
    assert COLON_HEX.match(leaf.SerialNumber)
    assert int(leaf.SerialNumber.replace(":", ""), 16) == cert.serial_number
    assert leaf.ValidAfter == "2026-05-01T11:59:00Z"  # backdated one minute for clock skew
    assert leaf.ValidBefore == "2026-05-04T12:00:00Z"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web"
    assert cert.issuer == _cert(root.RootCert).subject
    assert not _ext(cert, x509.BasicConstraints).value.ca
    ku = _ext(cert, x509.KeyUsage).value
    assert ku.digital_signature and ku.key_agreement and not ku.key_cert_sign
    eku = _ext(cert, x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [leaf.ServiceURI]
    assert san.get_values_for_type(x509.DNSName) == ["web.svc.default.7f42f496.consul"]
    key = serialization.load_pem_private_key(leaf.PrivateKeyPEM.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert verify_leaf(leaf.CertPEM, [root.RootCert], NOW) == leaf.ServiceURI
    assert verify_leaf(leaf.CertPEM, [root.RootCert], NOW, use_policy_builder=False) == leaf.ServiceURI


def test_leaf_ttl_clipped_to_root_and_verify_time_window() -> None:
    r = generate_root(TD, now=NOW, ttl_days=1)
    leaf = sign_leaf(r, "web", TD, "dc1", NOW, 10 * 24 * 3600)
    assert leaf.ValidBefore == r.NotAfter
    for pb in (True, False):
        with pytest.raises(BadRequest, match="expired"):
            verify_leaf(leaf.CertPEM, [r.RootCert], NOW + timedelta(days=2), use_policy_builder=pb)
        with pytest.raises(BadRequest):
            verify_leaf(leaf.CertPEM, [r.RootCert], NOW - timedelta(hours=1), use_policy_builder=pb)


def test_verify_rejects_foreign_root(root) -> None:
    other = generate_root(TD, now=NOW)
    leaf = sign_leaf(other, "web", TD, "dc1", NOW, 3600)
    for pb in (True, False):
        with pytest.raises(BadRequest, match="does not chain"):
            verify_leaf(leaf.CertPEM, [root.RootCert], NOW, use_policy_builder=pb)
    assert verify_leaf(leaf.CertPEM, [root.RootCert, other.RootCert], NOW).endswith("/svc/web")


@pytest.mark.parametrize(("service", "dc"), [("", "dc1"), ("a/b", "dc1"), ("web", ""), ("we b", "dc1"), ("web", "d\n")])
def test_leaf_bad_names(root, service: str, dc: str) -> None:
    with pytest.raises(BadRequest):
        sign_leaf(root, service, TD, dc, NOW, 3600)


# --------------------------------------------------------------------------------------- CSR

def _csr(uris: list[str], key=None) -> tuple[str, object]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uris:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode(), key


def test_csr_for_own_identity_signed(root) -> None:
    uri = f"spiffe://{TD}/ns/default/dc/dc1/svc/web"
    pem, key = _csr([uri])
    leaf = sign_leaf(root, "web", TD, "dc1", NOW, 3600, csr_pem=pem)
    assert leaf.PrivateKeyPEM == ""
    assert _cert(leaf.CertPEM).public_key().public_numbers() == key.public_key().public_numbers()
    assert verify_leaf(leaf.CertPEM, [root.RootCert], NOW) == uri
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem, _ = _csr([uri], rsa_key)
    cert = _cert(sign_leaf(root, "web", TD, "dc1", NOW, 3600, csr_pem=pem).CertPEM)
    assert _ext(cert, x509.KeyUsage).value.key_encipherment


@pytest.mark.parametrize(
    "uris",
    [[f"spiffe://{TD}/ns/default/dc/dc1/svc/db"],  # another service's identity
     [f"spiffe://{TD}/ns/default/dc/dc2/svc/web"],
     ["spiffe://evil.consul/ns/default/dc/dc1/svc/web"],
     [f"spiffe://{TD}/ns/default/dc/dc1/svc/web", f"spiffe://{TD}/ns/default/dc/dc1/svc/db"],
     []],
)
def test_csr_for_other_identity_refused(root, uris: list[str]) -> None:
    pem, _ = _csr(uris)
    with pytest.raises(BadRequest, match=r"CSR SAN .* does not match requested service spiffe://.*/svc/web"):
        sign_leaf(root, "web", TD, "dc1", NOW, 3600, csr_pem=pem)


def test_csr_garbage_and_bad_signature(root) -> None:
    with pytest.raises(BadRequest, match="CSR is not a valid"):
        sign_leaf(root, "web", TD, "dc1", NOW, 3600, csr_pem="not a csr")
    pem, _ = _csr([f"spiffe://{TD}/ns/default/dc/dc1/svc/web"])
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # flip a bit in the signature
    import base64
    body = base64.encodebytes(bytes(der)).decode()
    tampered = f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"
    with pytest.raises(BadRequest, match="CSR"):
        sign_leaf(root, "web", TD, "dc1", NOW, 3600, csr_pem=tampered)


# ------------------------------------------------------------------------------ cross-signing

def test_cross_signed_rotation(root) -> None:
    later = NOW + timedelta(days=30)
    new = generate_root(TD, now=later)
    xc = cross_sign(root, new, later)
    cross = _cert(xc)
    assert cross.subject == _cert(new.RootCert).subject
    assert cross.issuer == _cert(root.RootCert).subject
    assert cross.public_key().public_numbers() == _cert(new.RootCert).public_key().public_numbers()
    assert _ext(cross, x509.BasicConstraints).value.ca
    new.IntermediateCerts.append(xc)

    leaf = sign_leaf(new, "web", TD, "dc1", later, 3600)
    certs = x509.load_pem_x509_certificates(leaf.CertPEM.encode())
    assert len(certs) == 2 and certs[1] == cross  # leaf, then the cross-signed cert as intermediate
    for pb in (True, False):
        # Peers still on the old root accept leaves from the new key via the cross-signed cert...
        assert verify_leaf(leaf.CertPEM, [root.RootCert], later, use_policy_builder=pb) == leaf.ServiceURI
        # ...peers on the new root accept them directly...
        assert verify_leaf(leaf.CertPEM, [new.RootCert], later, use_policy_builder=pb) == leaf.ServiceURI
        # ...and without the cross-signed cert the old root cannot validate them.
        bare = _cert(leaf.CertPEM).public_bytes(serialization.Encoding.PEM).decode()
        with pytest.raises(BadRequest):
            verify_leaf(bare, [root.RootCert], later, use_policy_builder=pb)


# ---------------------------------------------------------------------- real TLS stacks agree

def _write(tmp: Path, name: str, data: str) -> str:
    p = tmp / name
    p.write_text(data)
    return str(p)


@pytest.mark.skipif(not HAVE_OPENSSL, reason="openssl CLI not installed")
def test_openssl_verify_accepts_leaf_and_cross_chain(root, tmp_path: Path) -> None:
    leaf = sign_leaf(root, "web", TD, "dc1", datetime.now(UTC), 3600)
    root_pem = _write(tmp_path, "root.pem", root.RootCert)
    leaf_pem = _write(tmp_path, "leaf.pem", leaf.CertPEM)
    out = subprocess.run(["openssl", "verify", "-purpose", "sslclient", "-CAfile", root_pem, leaf_pem],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr
    out = subprocess.run(["openssl", "verify", "-purpose", "sslserver", "-CAfile", root_pem, leaf_pem],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr

    now = datetime.now(UTC)
    new = generate_root(TD, now=now)
    new.IntermediateCerts.append(cross_sign(root, new, now))
    rotated = sign_leaf(new, "db", TD, "dc1", now, 3600)
    certs = x509.load_pem_x509_certificates(rotated.CertPEM.encode())
    only_leaf = _write(tmp_path, "rleaf.pem", certs[0].public_bytes(serialization.Encoding.PEM).decode())
    untrusted = _write(tmp_path, "cross.pem", new.IntermediateCerts[0])
    out = subprocess.run(["openssl", "verify", "-CAfile", root_pem, "-untrusted", untrusted, only_leaf],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run(["openssl", "verify", "-CAfile", root_pem, only_leaf],
                         capture_output=True, text=True, check=False)
    assert out.returncode != 0
    new_pem = _write(tmp_path, "new.pem", new.RootCert)
    out = subprocess.run(["openssl", "verify", "-CAfile", new_pem, "-untrusted", untrusted, only_leaf],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def _handshake(client: ssl.SSLObject, server: ssl.SSLObject, c_in: ssl.MemoryBIO, c_out: ssl.MemoryBIO,
               s_in: ssl.MemoryBIO, s_out: ssl.MemoryBIO) -> None:
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, obj in (("c", client), ("s", server)):
            if done[name]:
                continue
            try:
                obj.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
        # shuttle bytes both ways
        data = c_out.read()
        if data:
            s_in.write(data)
        data = s_out.read()
        if data:
            c_in.write(data)
        if done["c"] and done["s"]:
            return
    raise AssertionError("handshake did not complete")


def _mtls(tmp: Path, server_leaf, client_leaf, server_trust: str, client_trust: str, server_name: str):
    s_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    s_ctx.load_cert_chain(_write(tmp, "s.pem", server_leaf.CertPEM), _write(tmp, "s.key", server_leaf.PrivateKeyPEM))
    s_ctx.verify_mode = ssl.CERT_REQUIRED
    s_ctx.load_verify_locations(cadata=server_trust)
    c_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    c_ctx.load_cert_chain(_write(tmp, "c.pem", client_leaf.CertPEM), _write(tmp, "c.key", client_leaf.PrivateKeyPEM))
    c_ctx.load_verify_locations(cadata=client_trust)
    bios = [ssl.MemoryBIO() for _ in range(4)]
    c_in, c_out, s_in, s_out = bios
    client = c_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname=server_name)
    server = s_ctx.wrap_bio(s_in, s_out, server_side=True)
    _handshake(client, server, c_in, c_out, s_in, s_out)
    # Application data flows and each side sees the other's SPIFFE identity.
    client.write(b"ping")
    s_in.write(c_out.read())
    assert server.read(4) == b"ping"
    return client.getpeercert(), server.getpeercert()


def test_mtls_handshake_with_two_leaves(root, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    db = sign_leaf(root, "db", TD, "dc1", now, 3600)
    web = sign_leaf(root, "web", TD, "dc1", now, 3600)
    seen_by_client, seen_by_server = _mtls(tmp_path, db, web, root.RootCert, root.RootCert,
                                           "db.svc.default.7f42f496.consul")
    assert ("URI", db.ServiceURI) in seen_by_client["subjectAltName"]
    assert ("URI", web.ServiceURI) in seen_by_server["subjectAltName"]


def test_mtls_across_rotation(root, tmp_path: Path) -> None:
    """Client already rotated (new root + cross-signed chain); server still trusts only the old root."""
    now = datetime.now(UTC)
    new = generate_root(TD, now=now)
    new.IntermediateCerts.append(cross_sign(root, new, now))
    db_old = sign_leaf(root, "db", TD, "dc1", now, 3600)
    web_new = sign_leaf(new, "web", TD, "dc1", now, 3600)
    _, seen_by_server = _mtls(tmp_path, db_old, web_new, root.RootCert, root.RootCert + new.RootCert,
                              "db.svc.default.7f42f496.consul")
    assert ("URI", web_new.ServiceURI) in seen_by_server["subjectAltName"]


def test_mtls_rejects_foreign_ca(root, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    other = generate_root(TD, now=now)
    db = sign_leaf(root, "db", TD, "dc1", now, 3600)
    intruder = sign_leaf(other, "web", TD, "dc1", now, 3600)
    with pytest.raises(ssl.SSLError):
        _mtls(tmp_path, db, intruder, root.RootCert, root.RootCert, "db.svc.default.7f42f496.consul")
