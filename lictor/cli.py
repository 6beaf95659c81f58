"""The `lictor` command, in Consul's shape: `lictor <command> [subcommand] [-flags]`."""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import signal
import ssl
import sys
import threading
from collections.abc import Callable
from typing import Any

import httpx

from lictor import __version__

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def http_addr(flag_value: str | None) -> str:
    addr = flag_value or os.environ.get("LICTOR_HTTP_ADDR") or os.environ.get("CONSUL_HTTP_ADDR") or "127.0.0.1:8500"
    scheme = "https" if _env_true("HTTP_SSL") else "http"
    return addr if addr.startswith(("http://", "https://")) else f"{scheme}://{addr}"


def _env(name: str) -> str:
    return os.environ.get(f"LICTOR_{name}") or os.environ.get(f"CONSUL_{name}") or ""


def _env_true(name: str) -> bool:
    return _env(name).lower() in ("1", "true", "yes")


def tls_kwargs() -> dict[str, Any]:
    """httpx TLS options from Consul's variables: CONSUL_CACERT, CONSUL_CLIENT_CERT/KEY, CONSUL_HTTP_SSL_VERIFY."""
    if _env("HTTP_SSL_VERIFY").lower() in ("0", "false", "no"):
        return {"verify": False}
    context = ssl.create_default_context(cafile=_env("CACERT") or None)
    cert, key = _env("CLIENT_CERT"), _env("CLIENT_KEY")
    if cert and key:
        context.load_cert_chain(cert, key)
    return {"verify": context}


class CLIError(Exception):
    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def _client_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False)
    parser.add_argument("-http-addr", "--http-addr", dest="http_addr", default=None)
    parser.add_argument("-token", "--token", dest="token",
                        default=os.environ.get("LICTOR_HTTP_TOKEN") or os.environ.get("CONSUL_HTTP_TOKEN"))
    parser.add_argument("-format", "--format", dest="format", choices=["table", "json"], default="table")
    return parser


def _request(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> httpx.Response:
    base = http_addr(args.http_addr)
    headers = {"X-Consul-Token": args.token} if getattr(args, "token", None) else {}
    try:
        with httpx.Client(timeout=30.0, **tls_kwargs()) as client:
            resp = client.request(method, base + path, headers=headers, **kwargs)
    except httpx.ConnectError:
        raise CLIError(
            f"cannot reach an agent at {base}: is `lictor agent` running? "
            "Set -http-addr or LICTOR_HTTP_ADDR to point at one."
        ) from None
    except httpx.HTTPError as exc:
        raise CLIError(f"request to {base}{path} failed: {exc}") from None
    if resp.status_code == 403:
        raise CLIError(f"permission denied ({resp.text.strip()}): check -token or CONSUL_HTTP_TOKEN")
    if resp.status_code >= 400 and resp.status_code != 404:
        raise CLIError(f"{method} {path}: {resp.status_code} {resp.text.strip()}")
    return resp


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in [header] + rows]
    return "\n".join(lines)


def cmd_agent(argv: list[str]) -> int:
    from lictor.config import ConfigError, parse_agent_args
    from lictor.runtime import run_agent

    try:
        config = parse_agent_args(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run_agent(config)


def cmd_keygen(argv: list[str]) -> int:
    print(base64.b64encode(secrets.token_bytes(32)).decode())
    return EXIT_OK


def cmd_version(argv: list[str]) -> int:
    print(f"Lictor v{__version__}")
    print("Protocol 2 spoken by default, understands Consul's HTTP API v1")
    return EXIT_OK


STATUS_NAMES = {0: "none", 1: "alive", 2: "leaving", 3: "left", 4: "failed"}


def cmd_members(argv: list[str]) -> int:
    args = _client_parser("lictor members").parse_args(argv)
    members = _request(args, "GET", "/v1/agent/members").json()
    if args.format == "json":
        print(json.dumps(members, indent=2))
        return EXIT_OK
    rows = [
        [m["Name"], f"{m['Addr']}:{m['Port']}", STATUS_NAMES.get(m["Status"], "?"),
         "server" if m["Tags"].get("role") == "consul" else "client", m["Tags"].get("dc", "")]
        for m in members
    ]
    print(_table(rows, ["Node", "Address", "Status", "Type", "DC"]))
    return EXIT_OK


def cmd_operator(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "raft" or argv[1] not in ("list-peers", "remove-peer"):
        print("usage: lictor operator raft list-peers|remove-peer [-address host:port]", file=sys.stderr)
        return EXIT_USAGE
    parser = _client_parser(f"lictor operator raft {argv[1]}")
    parser.add_argument("-address", "--address", dest="address", default=None)
    args = parser.parse_args(argv[2:])
    if argv[1] == "list-peers":
        config = _request(args, "GET", "/v1/operator/raft/configuration").json()
        if args.format == "json":
            print(json.dumps(config, indent=2))
            return EXIT_OK
        rows = [[s["Node"], s["ID"], s["Address"], "leader" if s["Leader"] else "follower", str(s["Voter"]).lower()]
                for s in config["Servers"]]
        print(_table(rows, ["Node", "ID", "Address", "State", "Voter"]))
        return EXIT_OK
    if not args.address:
        raise CLIError("remove-peer needs -address host:port (see `lictor operator raft list-peers`)", EXIT_USAGE)
    _request(args, "DELETE", "/v1/operator/raft/peer", params={"address": args.address})
    print(f"Removed peer with address {args.address!r}")
    return EXIT_OK


def cmd_demo(argv: list[str]) -> int:
    from lictor.demo import main as demo_main

    return demo_main(argv)


def cmd_gateway(argv: list[str]) -> int:
    from lictor.gateway.cli import main as gateway_main

    return gateway_main(argv) or 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "demo": cmd_demo,
    "gateway": cmd_gateway,
    "agent": cmd_agent,
    "keygen": cmd_keygen,
    "version": cmd_version,
    "members": cmd_members,
    "operator": cmd_operator,
}


def register_command(name: str, func: Callable[[list[str]], int]) -> None:
    COMMANDS[name] = func


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _interruptible()
    try:
        from lictor import cli_extra  # noqa: F401 - more commands register themselves
    except ImportError:
        pass
    from lictor import monitor  # noqa: F401 - registers `monitor` and `debug`
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: lictor <command> [args]\n\ncommands:\n  " + "\n  ".join(sorted(COMMANDS)))
        return EXIT_OK if argv else EXIT_USAGE
    if argv[0] in ("-v", "-version", "--version"):
        return cmd_version([])
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"error: unknown command {argv[0]!r}; run `lictor help` for the list", file=sys.stderr)
        return EXIT_USAGE
    try:
        return command(argv[1:])
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code


def _interruptible() -> None:
    """Ctrl-C (SIGINT) stops a command even if it was started with SIGINT ignored, as a shell does
    for `cmd &` without job control: Python then never raises KeyboardInterrupt, so `lictor watch &`
    and `lictor monitor &` in a script could not be stopped the way Consul's (Go re-enables an
    ignored SIGINT it is asked to catch) are."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    # `python -m lictor.cli` runs this file as __main__: use the importable module instead, so the
    # commands lictor.cli_extra registers (and its CLIError) are the ones main() sees.
    from lictor.cli import main as _main

    sys.exit(_main())
