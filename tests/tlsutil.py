"""Test certificates for the HTTPS tests, made with `openssl`, and clients that use them.

An ECDSA P-256 CA; a server cert for 127.0.0.1/localhost/server.dc1.consul usable both ways (serverAuth
and clientAuth, like `consul tls cert create -server`: servers present it when they call each other);
a client cert; a server cert without the server.dc1.consul name (for -verify-server-hostname); and a
second ("rogue") CA with its own client cert.
"""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
from procs import AgentProc


@dataclass
class Certs:
    ca: Path
    server: tuple[Path, Path]
    client: tuple[Path, Path]
    rogue_ca: Path
    rogue_client: tuple[Path, Path]
    unnamed_server: tuple[Path, Path]  # signed by `ca`, but not for server.dc1.consul


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


def _make_ca(root: Path, name: str) -> tuple[Path, Path]:
    key, pem = root / f"{name}.key", root / f"{name}.pem"
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key))
    _openssl("req", "-x509", "-new", "-key", str(key), "-sha256", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-out", str(pem))
    return pem, key


def _make_leaf(root: Path, name: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    key, csr, pem, extfile = root / f"{name}.key", root / f"{name}.csr", root / f"{name}.pem", root / f"{name}.ext"
    extfile.write_text(ext + "\n")
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key))
    _openssl("req", "-new", "-key", str(key), "-subj", f"/CN={name}", "-out", str(csr))
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-days", "2", "-sha256", "-extfile", str(extfile), "-out", str(pem))
    return pem, key


def make_certs(root: Path) -> Certs:
    ca = _make_ca(root, "ca")
    rogue = _make_ca(root, "rogue-ca")
    both_ways = "extendedKeyUsage=serverAuth,clientAuth"
    server = _make_leaf(root, "server", ca,
                        f"subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:server.dc1.consul\n{both_ways}")
    unnamed = _make_leaf(root, "unnamed-server", ca, f"subjectAltName=IP:127.0.0.1,DNS:localhost\n{both_ways}")
    client = _make_leaf(root, "client", ca, "extendedKeyUsage=clientAuth")
    rogue_client = _make_leaf(root, "rogue-client", rogue, "extendedKeyUsage=clientAuth")
    return Certs(ca[0], server, client, rogue[0], rogue_client, unnamed)


def tls_args(certs: Certs, https_port: int, verify_incoming: bool = True) -> list[str]:
    """An agent's HTTPS listener flags: the server cert, the CA, client certs required."""
    args = ["-https-port", str(https_port), "-cert-file", str(certs.server[0]), "-key-file", str(certs.server[1]),
            "-ca-file", str(certs.ca)]
    return args + (["-verify-incoming"] if verify_incoming else [])


def client_context(certs: Certs, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """Trusts `certs.ca`, presents `cert` (default: the client cert)."""
    context = ssl.create_default_context(cafile=str(certs.ca))
    cert = cert or certs.client
    context.load_cert_chain(str(cert[0]), str(cert[1]))
    return context


def https_client(certs: Certs, **kwargs: object) -> httpx.Client:
    return httpx.Client(verify=client_context(certs), timeout=kwargs.pop("timeout", 10.0), **kwargs)  # type: ignore[arg-type]


def curl(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """curl's HTTP status on stdout ("000"/"" when no response came); bounded in time."""
    return subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", *args, url],
                          capture_output=True, text=True, timeout=20)


@dataclass
class HttpsAgentProc(AgentProc):
    """An agent whose API the test reaches over HTTPS (trusting `certs.ca`, presenting the client cert).

    `http_port` holds the HTTPS port, so http_addr is the address other agents -retry-join.
    """

    certs: Certs | None = None
    _context: ssl.SSLContext | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.http_port}"

    def context(self) -> ssl.SSLContext:
        if self._context is None:
            assert self.certs is not None
            self._context = client_context(self.certs)
        return self._context

    def get(self, path: str, **kwargs) -> httpx.Response:  # noqa: ANN003
        return httpx.get(self.url + path, verify=self.context(), timeout=kwargs.pop("timeout", 10.0), **kwargs)

    def put(self, path: str, **kwargs) -> httpx.Response:  # noqa: ANN003
        return httpx.put(self.url + path, verify=self.context(), timeout=kwargs.pop("timeout", 10.0), **kwargs)
