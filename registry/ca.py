"""The built-in Connect CA: root generation, cross-signing for rotation, leaf signing, verification.

Pure functions: the caller passes `now` (timezone-aware or naive-UTC datetime) and gets plain data
back. The only non-determinism is key generation (and ECDSA signature nonces); serial numbers and IDs
are derived from the inputs, so a given key + time always yields the same identifiers.

Shapes follow Consul's `/v1/connect/ca/roots` and `/v1/agent/connect/ca/leaf/<service>` JSON.
Identity lives in the URI SAN: `spiffe://<trust-domain>/ns/<ns>/dc/<dc>/svc/<service>`.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lictor.errors import BadRequest

try:  # cryptography >= 42
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    _HAVE_POLICY_BUILDER = True
except ImportError:  # pragma: no cover - older cryptography: manual chain walk only
    _HAVE_POLICY_BUILDER = False

ROOT_NAME = "Lictor CA Root Cert"
CLOCK_SKEW = timedelta(minutes=1)  # leaves and cross-signed certs are backdated by this much
DEFAULT_LEAF_TTL = 72 * 3600
_KEY_BITS = {"ec": (256, 384), "rsa": (2048, 3072, 4096)}

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


@dataclass
class CARoot:
    ID: str
    Name: str
    SerialNumber: int
    SigningKeyID: str
    NotBefore: str
    NotAfter: str
    RootCert: str
    PrivateKey: str
    PrivateKeyType: str
    PrivateKeyBits: int
    TrustDomain: str
    IntermediateCerts: list[str] = field(default_factory=list)
    ExternalTrustDomain: str = ""
    Active: bool = True

    def to_api(self) -> dict[str, Any]:
        """The public JSON for /v1/connect/ca/roots (never the private key)."""
        out = asdict(self)
        out.pop("PrivateKey")
        out.pop("TrustDomain")
        out["IntermediateCerts"] = list(self.IntermediateCerts) or None
        return out


@dataclass
class Leaf:
    SerialNumber: str
    CertPEM: str
    PrivateKeyPEM: str
    Service: str
    ServiceURI: str
    ValidAfter: str
    ValidBefore: str
    Namespace: str = "default"

    def to_api(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------ helpers

def _utc(now: datetime) -> datetime:
    now = now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)
    return now.replace(microsecond=0)  # X.509 times have one-second resolution


def rfc3339(t: datetime) -> str:
    return _utc(t).strftime("%Y-%m-%dT%H:%M:%SZ")


def colon_hex(data: bytes) -> str:
    return ":".join(f"{b:02x}" for b in data)


def serial_colon_hex(serial: int) -> str:
    length = max(1, (serial.bit_length() + 7) // 8)
    return colon_hex(serial.to_bytes(length, "big"))


def _spki_der(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _derive_serial(*parts: bytes) -> int:
    # 63 bits of a hash of the inputs: positive, non-zero, unique per (key, time, purpose).
    h = hashlib.sha256(b"\x00".join(parts)).digest()
    return (int.from_bytes(h[:8], "big") >> 1) or 1


def _hash_for(key: PrivateKey) -> hashes.HashAlgorithm:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _load_key(pem: str) -> PrivateKey:
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise BadRequest("CA private key must be an EC or RSA key")
    return key


def _key_pem(key: PrivateKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        fmt = serialization.PrivateFormat.TraditionalOpenSSL  # "EC PRIVATE KEY", what Consul emits
    else:
        fmt = serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode()


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def load_pem_chain(pem: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem.encode())
    except ValueError as exc:
        raise BadRequest(f"invalid PEM certificate data: {exc}") from None
    return certs


def _generate_key(key_type: str, key_bits: int) -> PrivateKey:
    if key_type not in _KEY_BITS:
        raise BadRequest(f"PrivateKeyType must be 'ec' or 'rsa', got {key_type!r}")
    if key_bits not in _KEY_BITS[key_type]:
        raise BadRequest(f"PrivateKeyBits for {key_type} must be one of {list(_KEY_BITS[key_type])}, got {key_bits!r}")
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1() if key_bits == 256 else ec.SECP384R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=key_bits)


def _trust_domain_ok(td: str) -> str:
    if not isinstance(td, str) or not td or any(c in td for c in "/:?#@ ") or any(ord(c) < 0x21 for c in td):
        raise BadRequest(f"trust domain must be a bare host name, got {td!r}")
    return td.lower()


def spiffe_id(trust_domain: str, service: str, dc: str, namespace: str = "default") -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/dc/{dc}/svc/{service}"


def _ca_extensions(builder: x509.CertificateBuilder, pub: PublicKey, issuer_pub: PublicKey,
                   uri: str, path_length: int) -> x509.CertificateBuilder:
    return (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_pub), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
    )


# ------------------------------------------------------------------------------------------ root

def generate_root(trust_domain: str, key_type: str = "ec", key_bits: int = 256, *, now: datetime,
                  ttl_days: int = 3650) -> CARoot:
    """A self-signed root for `trust_domain` (URI SAN `spiffe://<td>`)."""
    td = _trust_domain_ok(trust_domain)
    if not isinstance(ttl_days, int) or ttl_days <= 0:
        raise BadRequest("ttl_days must be a positive integer")
    key = _generate_key(key_type, key_bits)
    pub = key.public_key()
    start = _utc(now)
    serial = _derive_serial(b"root", _spki_der(pub), start.isoformat().encode())
    # The serial in the CN keeps subjects distinct across rotations, so a cross-signed cert for the
    # new root never shares its subject with the old root (chain building matches on names).
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, f"Lictor CA {serial}"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Lictor"),
    ])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pub)
        .serial_number(serial)
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(start + timedelta(days=ttl_days))
    )
    # pathlen 1, not 0: after a rotation the cross-signed certificate for the new root sits between
    # the old root and the leaves, and OpenSSL enforces the old root's pathlen on that chain.
    builder = _ca_extensions(builder, pub, pub, f"spiffe://{td}", path_length=1)
    cert = builder.sign(key, _hash_for(key))
    return _root_from_cert(cert, key, td)


def _root_from_cert(cert: x509.Certificate, key: PrivateKey, td: str) -> CARoot:
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    pub = key.public_key()
    key_type = "ec" if isinstance(key, ec.EllipticCurvePrivateKey) else "rsa"
    return CARoot(
        ID=colon_hex(hashlib.sha1(_spki_der(pub)).digest()),
        Name=ROOT_NAME,
        SerialNumber=cert.serial_number,
        SigningKeyID=colon_hex(ski),
        NotBefore=rfc3339(cert.not_valid_before_utc),
        NotAfter=rfc3339(cert.not_valid_after_utc),
        RootCert=_cert_pem(cert),
        PrivateKey=_key_pem(key),
        PrivateKeyType=key_type,
        PrivateKeyBits=key.curve.key_size if isinstance(key, ec.EllipticCurvePrivateKey) else key.key_size,
        TrustDomain=td,
    )


def root_from_pem(cert_pem: str, key_pem: str, trust_domain: str) -> CARoot:
    """Wrap an operator-supplied root (CA config `RootCert` + `PrivateKey`)."""
    certs = load_pem_chain(cert_pem)
    if len(certs) != 1:
        raise BadRequest("RootCert must contain exactly one certificate")
    key = _load_key(key_pem)
    if _spki_der(certs[0].public_key()) != _spki_der(key.public_key()):  # type: ignore[arg-type]
        raise BadRequest("PrivateKey does not match RootCert")
    try:
        bc = certs[0].extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise BadRequest("RootCert is not a CA certificate")
    return _root_from_cert(certs[0], key, _trust_domain_ok(trust_domain))


def cross_sign(old_root: CARoot, new_root: CARoot, now: datetime) -> str:
    """The new root's subject and key, issued and signed by the old root: leaves signed by the new
    key chain to the old root through it, so peers that only trust the old root keep working while
    the rotation propagates. Append the result to `new_root.IntermediateCerts`."""
    old_key = _load_key(old_root.PrivateKey)
    old_cert = x509.load_pem_x509_certificate(old_root.RootCert.encode())
    new_cert = x509.load_pem_x509_certificate(new_root.RootCert.encode())
    new_pub = new_cert.public_key()
    start = _utc(now)
    not_after = min(new_cert.not_valid_after_utc, old_cert.not_valid_after_utc)
    if not_after <= start:
        raise BadRequest("cannot cross-sign: the old root has expired")
    uris = [u.value for u in _uri_sans(new_cert)] or [f"spiffe://{new_root.TrustDomain}"]
    builder = (
        x509.CertificateBuilder()
        .subject_name(new_cert.subject)
        .issuer_name(old_cert.subject)
        .public_key(new_pub)  # type: ignore[arg-type]
        .serial_number(_derive_serial(b"cross", _spki_der(new_pub), old_cert.fingerprint(hashes.SHA256()),  # type: ignore[arg-type]
                                      start.isoformat().encode()))
        .not_valid_before(max(start - CLOCK_SKEW, old_cert.not_valid_before_utc))
        .not_valid_after(not_after)
    )
    builder = _ca_extensions(builder, new_pub, old_key.public_key(), uris[0], path_length=0)  # type: ignore[arg-type]
    return _cert_pem(builder.sign(old_key, _hash_for(old_key)))


def _uri_sans(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[x509.UniformResourceIdentifier]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [g for g in san if isinstance(g, x509.UniformResourceIdentifier)]


# ------------------------------------------------------------------------------------------- leaf

def _check_label(field_name: str, value: str) -> str:
    if not isinstance(value, str) or not value or any(c in value for c in "/?#% ") or any(
        ord(c) < 0x21 or ord(c) == 0x7F for c in value
    ):
        raise BadRequest(f"{field_name} must be a non-empty name without '/', '?', '#', '%' or whitespace, got {value!r}")
    return value


def sign_leaf(root: CARoot, service: str, trust_domain: str, dc: str, now: datetime,
              ttl_seconds: int = DEFAULT_LEAF_TTL, csr_pem: str | None = None,
              namespace: str = "default") -> Leaf:
    """Issue a service leaf signed by `root`'s key. Without a CSR we generate an ECDSA P-256 key and
    return it; with one, its signature is verified and its URI SAN must be exactly this service's
    SPIFFE ID (a caller can't obtain another service's identity)."""
    _check_label("service", service)
    _check_label("datacenter", dc)
    _check_label("namespace", namespace)
    td = _trust_domain_ok(trust_domain)
    if not isinstance(ttl_seconds, int) or ttl_seconds <= 0:
        raise BadRequest("ttl_seconds must be a positive integer")
    uri = spiffe_id(td, service, dc, namespace)

    key_pem = ""
    if csr_pem is None:
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        pub: PublicKey = leaf_key.public_key()
        key_pem = _key_pem(leaf_key)
    else:
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode() if isinstance(csr_pem, str) else csr_pem)
        except (ValueError, TypeError) as exc:
            raise BadRequest(f"CSR is not a valid PEM certificate request: {exc}") from None
        if not csr.is_signature_valid:
            raise BadRequest("CSR signature is invalid")
        csr_pub = csr.public_key()
        if not isinstance(csr_pub, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise BadRequest("CSR key must be EC or RSA")
        if isinstance(csr_pub, rsa.RSAPublicKey) and csr_pub.key_size < 2048:
            raise BadRequest("CSR RSA key must be at least 2048 bits")
        sans = [u.value for u in _uri_sans(csr)]
        if sans != [uri]:
            shown = ", ".join(sans) if sans else "<none>"
            raise BadRequest(f"CSR SAN {shown} does not match requested service {uri}")
        pub = csr_pub

    ca_key = _load_key(root.PrivateKey)
    root_cert = x509.load_pem_x509_certificate(root.RootCert.encode())
    start = _utc(now)
    not_before = max(start - CLOCK_SKEW, root_cert.not_valid_before_utc)
    not_after = min(start + timedelta(seconds=ttl_seconds), root_cert.not_valid_after_utc)
    if not_after <= start:
        raise BadRequest("cannot sign leaf: the CA root has expired")
    serial = _derive_serial(b"leaf", _spki_der(pub), uri.encode(), start.isoformat().encode(),
                            root.SigningKeyID.encode())
    is_rsa = isinstance(pub, rsa.RSAPublicKey)
    dns_name = f"{service}.svc.{namespace}.{td.split('.')[0][:8]}.consul"
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    try:
        sans.append(x509.DNSName(dns_name))  # lets stock TLS clients do hostname checks
    except ValueError:
        pass
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service[:64])]))
        .issuer_name(root_cert.subject)
        .public_key(pub)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=is_rsa,
                          data_encipherment=False, key_agreement=not is_rsa, key_cert_sign=False,
                          crl_sign=False, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
    )
    cert = builder.sign(ca_key, _hash_for(ca_key))
    chain = _cert_pem(cert) + "".join(p if p.endswith("\n") else p + "\n" for p in root.IntermediateCerts)
    return Leaf(
        SerialNumber=serial_colon_hex(serial),
        CertPEM=chain,
        PrivateKeyPEM=key_pem,
        Service=service,
        ServiceURI=uri,
        ValidAfter=rfc3339(not_before),
        ValidBefore=rfc3339(not_after),
        Namespace=namespace,
    )


# ---------------------------------------------------------------------------------- verification

def _verify_signature(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    pub = issuer.public_key()
    try:
        if isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))  # type: ignore[arg-type]
        elif isinstance(pub, rsa.RSAPublicKey):
            pub.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)  # type: ignore[arg-type]
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _is_ca(cert: x509.Certificate) -> tuple[bool, int | None]:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False, None
    return bc.ca, bc.path_length


def _valid_at(cert: x509.Certificate, when: datetime) -> bool:
    return cert.not_valid_before_utc <= when <= cert.not_valid_after_utc


def verify_leaf(cert_pem: str, roots_pems: list[str], now: datetime, *, use_policy_builder: bool = True) -> str:
    """Check `cert_pem` (leaf first, then any intermediates/cross-signed certs) chains to one of the
    roots at `now`; return the leaf's SPIFFE URI. BadRequest when it doesn't.

    Uses cryptography's RFC 5280 client verifier (`PolicyBuilder.build_client_verifier`, which
    unlike the server verifier needs no DNS/IP SAN, so URI-only mesh identities pass) when available,
    else a manual walk. Both check signatures, validity windows, names, CA flags and path lengths."""
    when = _utc(now)
    chain = load_pem_chain(cert_pem)
    if not chain:
        raise BadRequest("no certificate in leaf PEM")
    leaf, pool = chain[0], chain[1:]
    roots = [c for pem in roots_pems for c in load_pem_chain(pem)]
    if not roots:
        raise BadRequest("no trusted roots")
    if _is_ca(leaf)[0]:
        raise BadRequest("leaf certificate is a CA certificate")
    uris = [u.value for u in _uri_sans(leaf)]
    if len(uris) != 1 or not uris[0].startswith("spiffe://"):
        raise BadRequest("leaf certificate has no single SPIFFE URI SAN")
    if not _valid_at(leaf, when):
        raise BadRequest("leaf certificate is expired or not yet valid")
    if use_policy_builder and _HAVE_POLICY_BUILDER:
        try:
            verifier = PolicyBuilder().store(Store(roots)).time(when).build_client_verifier()
            verifier.verify(leaf, pool)
        except VerificationError as exc:
            raise BadRequest(f"leaf certificate does not chain to a trusted root: {exc}") from None
        return uris[0]

    # Depth-first over candidate issuers: trusted roots first, then supplied intermediates.
    def walk(cert: x509.Certificate, cas_below: int, used: frozenset[int]) -> bool:
        for root in roots:
            if root.subject == cert.issuer and _verify_signature(cert, root):
                is_ca, plen = _is_ca(root)
                if is_ca and _valid_at(root, when) and (plen is None or cas_below <= plen):
                    return True
        for idx, inter in enumerate(pool):
            if idx in used or inter.subject != cert.issuer:
                continue
            is_ca, plen = _is_ca(inter)
            if not (is_ca and _valid_at(inter, when) and (plen is None or cas_below <= plen)):
                continue
            if _verify_signature(cert, inter) and walk(inter, cas_below + 1, used | {idx}):
                return True
        return False

    if not walk(leaf, 0, frozenset()):
        raise BadRequest("leaf certificate does not chain to a trusted root")
    return uris[0]
