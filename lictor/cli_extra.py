"""The rest of the `lictor` CLI, in Consul's shape; `lictor.cli.main` imports this module and the
commands below register themselves into `lictor.cli.COMMANDS`.

Every client command takes `-http-addr` (else `LICTOR_HTTP_ADDR`, else `CONSUL_HTTP_ADDR`, else
127.0.0.1:8500), `-token` (else `LICTOR_HTTP_TOKEN`, else `CONSUL_HTTP_TOKEN`) and `-format table|json`.
Human output goes to stdout, progress and errors to stderr (errors as one line saying what to do next).

Exit codes:
  0  success (and "Allowed" for `intention check`)
  1  error: no agent reachable, request rejected, permission denied, CAS failed, unreadable file
  2  usage error, or a negative answer: not found (`kv get`, `intention get|delete`, `config read`,
     `services deregister`, `catalog nodes -service`), "Denied" for `intention check`
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from lictor import __version__
from lictor.cli import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    CLIError,
    _client_parser,
    _table,
    cmd_operator,
    http_addr,
    register_command,
    tls_kwargs,
)

EXIT_NEGATIVE = 2  # a well-formed question whose answer is "no" / "not found"


# -- plumbing ---------------------------------------------------------------------------------------


def _parser(prog: str, description: str | None = None) -> argparse.ArgumentParser:
    parser = _client_parser(prog)
    parser.description = description
    return parser


def _usage(text: str) -> int:
    print(f"usage: {text}", file=sys.stderr)
    return EXIT_USAGE


def _headers(args: argparse.Namespace) -> dict[str, str]:
    return {"X-Consul-Token": args.token} if getattr(args, "token", None) else {}


def _check(args: argparse.Namespace, method: str, path: str, resp: httpx.Response) -> httpx.Response:
    """Turn an HTTP failure into a one-line CLIError that says what to do next; 404s are the caller's."""
    status = resp.status_code
    if status < 400:
        return resp
    text = resp.text.strip()
    base = http_addr(args.http_addr)
    if status in (401, 403):
        raise CLIError(f"permission denied ({text or status}): check -token, LICTOR_HTTP_TOKEN or CONSUL_HTTP_TOKEN")
    if status == 404 and text in ("404 page not found", "Not Found"):
        raise CLIError(f"the agent at {base} does not serve {method} {path} (404 page not found): "
                       "it runs an older lictor; upgrade the agent or point -http-addr at one that has it")
    if status == 404:
        return resp
    if status == 400:
        raise CLIError(f"the agent rejected {method} {path}: {text}: fix the input and retry")
    if status == 413:
        raise CLIError(f"the agent rejected {method} {path} as too large: {text}")
    if "No cluster leader" in text:
        raise CLIError("the cluster has no leader right now: wait for one with `lictor operator raft wait-leader`, "
                       "and check that a quorum of servers is up with `lictor members`")
    raise CLIError(f"{method} {path} failed: {status} {text}; see the agent's log for details")


def _unreachable(base: str, exc: BaseException | None = None) -> CLIError:
    if exc is not None and ("CERTIFICATE" in str(exc).upper() or "SSL" in str(exc).upper()):
        return CLIError(f"TLS with the agent at {base} failed ({exc}): set LICTOR_CACERT or CONSUL_CACERT to the CA "
                        "that signed its certificate (and CONSUL_CLIENT_CERT/KEY if it verifies clients)")
    return CLIError(f"cannot reach an agent at {base}: is `lictor agent` running? "
                    "Set -http-addr or LICTOR_HTTP_ADDR to point at one.")


def _api(args: argparse.Namespace, method: str, path: str, *, params: Any = None, content: Any = None,
         json_body: Any = None, timeout: float = 30.0, extra_headers: dict[str, str] | None = None) -> httpx.Response:
    base = http_addr(args.http_addr)
    headers = _headers(args) | (extra_headers or {})
    try:
        with httpx.Client(timeout=timeout, **tls_kwargs()) as client:
            resp = client.request(method, base + path, params=params, content=content, json=json_body,
                                  headers=headers)
    except httpx.ConnectError as exc:
        raise _unreachable(base, exc) from None
    except httpx.TimeoutException:
        raise CLIError(f"the agent at {base} did not answer {method} {path} within {timeout:.0f}s: "
                       "check its log, or retry") from None
    except httpx.HTTPError as exc:
        raise CLIError(f"request to {base}{path} failed: {exc}") from None
    return _check(args, method, path, resp)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _q(name: str) -> str:
    return quote(name, safe="/")


def _read_input(source: str, what: str) -> bytes:
    """Bytes from a path, or from stdin when `source` is "-"."""
    if source == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise CLIError(f"cannot read {what} {source}: {exc.strerror or exc}: check the path") from None


def _load_json(source: str, what: str) -> Any:
    data = _read_input(source, what)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise CLIError(f"{what} {source} is not UTF-8 text: only JSON is supported") from None
    except json.JSONDecodeError as exc:
        raise CLIError(f"{what} {source} is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg}): "
                       "only JSON is supported; convert HCL with a tool such as hcl2json") from None


def _get_ci(obj: dict[str, Any], *names: str) -> Any:
    """A key looked up case-insensitively (Consul decodes bodies that way), with snake_case aliases."""
    wanted = {n.lower().replace("_", "") for n in names}
    for key, value in obj.items():
        if str(key).lower().replace("_", "") in wanted:
            return value
    return None


def _kv_pairs(items: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"{flag} takes key=value, got {item!r}", EXIT_USAGE)
        out[key] = value
    return out


def _subcommand(argv: list[str], choices: dict[str, Callable[[list[str]], int]], usage: str) -> int:
    if not argv or argv[0] not in choices:
        if argv and argv[0] not in ("-h", "--help", "help"):
            print(f"error: unknown subcommand {argv[0]!r}", file=sys.stderr)
        return _usage(usage)
    return choices[argv[0]](argv[1:])


class Progress:
    """Progress on stderr: a live line on a terminal, a start and an end line otherwise."""

    def __init__(self, label: str, total: int | None = None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self._last = 0.0
        self._announced = False

    def advance(self, count: int) -> None:
        if not self._announced and not self.tty:
            print(f"{self.label}...", file=sys.stderr, flush=True)
        self._announced = True
        self.done += count
        now = time.monotonic()
        if self.tty and now - self._last > 0.1:
            self._last = now
            of = f" of {_size(self.total)}" if self.total else ""
            print(f"\r{self.label}: {_size(self.done)}{of} ({now - self.started:.1f}s)", end="",
                  file=sys.stderr, flush=True)

    def finish(self, note: str = "") -> None:
        elapsed = time.monotonic() - self.started
        text = f"{self.label}: {_size(self.done)} in {elapsed:.1f}s{note}"
        print(f"\r{text}" if self.tty else text, file=sys.stderr, flush=True)


def _size(count: int | None) -> str:
    value = float(count or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


# -- version / leave / reload -----------------------------------------------------------------------


def cmd_version(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lictor version", allow_abbrev=False)
    parser.add_argument("-format", "--format", dest="format", choices=["table", "json"], default="table")
    args = parser.parse_args(argv)
    if args.format == "json":
        _print_json({"Version": __version__, "Revision": "", "Prerelease": "", "FIPS": "",
                     "RPC": {"Default": 2, "Min": 2, "Max": 3}})
        return EXIT_OK
    print(f"Lictor v{__version__}")
    print("Protocol 2 spoken by default, understands Consul's HTTP API v1")
    return EXIT_OK


def cmd_leave(argv: list[str]) -> int:
    args = _parser("lictor leave", "Gracefully leave the cluster and shut the agent down.").parse_args(argv)
    _api(args, "PUT", "/v1/agent/leave", timeout=60.0)
    print("Graceful leave complete")
    return EXIT_OK


def cmd_reload(argv: list[str]) -> int:
    args = _parser("lictor reload", "Make the agent reload its configuration files.").parse_args(argv)
    _api(args, "PUT", "/v1/agent/reload")
    print("Configuration reload triggered")
    return EXIT_OK


# -- catalog ----------------------------------------------------------------------------------------


def catalog_services(argv: list[str]) -> int:
    parser = _parser("lictor catalog services", "List services in the catalog.")
    parser.add_argument("-tags", "--tags", action="store_true", help="show each service's tags")
    parser.add_argument("-node", "--node", default=None, help="only services on this node")
    args = parser.parse_args(argv)
    if args.node:
        resp = _api(args, "GET", f"/v1/catalog/node/{_q(args.node)}")
        body = resp.json() if resp.status_code == 200 and resp.content else None
        if not body:
            raise CLIError(f"node {args.node!r} not found in the catalog: list nodes with `lictor catalog nodes`",
                           EXIT_NEGATIVE)
        services: dict[str, list[str]] = {}
        for svc in (body.get("Services") or {}).values():
            tags = services.setdefault(svc["Service"], [])
            tags.extend(t for t in svc.get("Tags") or [] if t not in tags)
    else:
        services = _api(args, "GET", "/v1/catalog/services").json()
    if args.format == "json":
        _print_json(services)
        return EXIT_OK
    names = sorted(services)
    if args.tags:
        print(_table([[n, ",".join(sorted(services[n]))] for n in names], ["Service", "Tags"]))
    else:
        print("\n".join(names))
    return EXIT_OK


def catalog_nodes(argv: list[str]) -> int:
    parser = _parser("lictor catalog nodes", "List nodes in the catalog.")
    parser.add_argument("-service", "--service", default=None, help="only nodes running this service")
    parser.add_argument("-detailed", "--detailed", action="store_true", help="full IDs, tagged addresses, meta")
    args = parser.parse_args(argv)
    if args.service:
        entries = _api(args, "GET", f"/v1/catalog/service/{_q(args.service)}").json() or []
        if not entries:
            if args.format == "json":
                _print_json([])
            raise CLIError(f"service {args.service!r} not found in the catalog: "
                           "list services with `lictor catalog services`", EXIT_NEGATIVE)
        if args.format == "json":
            _print_json(entries)
            return EXIT_OK
        seen: dict[str, dict[str, Any]] = {}
        for e in entries:
            seen.setdefault(e["Node"], {"Node": e["Node"], "ID": e.get("ID", ""), "Address": e.get("Address", ""),
                                        "Datacenter": e.get("Datacenter", ""),
                                        "TaggedAddresses": e.get("TaggedAddresses") or {},
                                        "Meta": e.get("NodeMeta") or {}})
        nodes = list(seen.values())
    else:
        nodes = _api(args, "GET", "/v1/catalog/nodes").json() or []
        if args.format == "json":
            _print_json(nodes)
            return EXIT_OK
    header = ["Node", "ID", "Address", "DC"]
    if args.detailed:
        header += ["TaggedAddresses", "Meta"]
    rows = []
    for n in sorted(nodes, key=lambda n: n["Node"]):
        row = [n["Node"], n.get("ID", "") if args.detailed else n.get("ID", "")[:8], n.get("Address", ""),
               n.get("Datacenter", "")]
        if args.detailed:
            row += [",".join(f"{k}={v}" for k, v in sorted((n.get("TaggedAddresses") or {}).items())),
                    ",".join(f"{k}={v}" for k, v in sorted((n.get("Meta") or {}).items()))]
        rows.append(row)
    print(_table(rows, header))
    return EXIT_OK


def catalog_datacenters(argv: list[str]) -> int:
    args = _parser("lictor catalog datacenters", "List known datacenters.").parse_args(argv)
    dcs = _api(args, "GET", "/v1/catalog/datacenters").json()
    if args.format == "json":
        _print_json(dcs)
    else:
        print("\n".join(dcs))
    return EXIT_OK


def cmd_catalog(argv: list[str]) -> int:
    return _subcommand(argv, {"services": catalog_services, "nodes": catalog_nodes,
                              "datacenters": catalog_datacenters},
                       "lictor catalog services|nodes|datacenters [options]")


# -- services ---------------------------------------------------------------------------------------


def _service_definitions(path: str) -> list[dict[str, Any]]:
    """Service definitions from a file in the agent's config shape: {"service": {..}}, {"services": [..]},
    or a bare definition."""
    data = _load_json(path, "service definition")
    if isinstance(data, dict) and _get_ci(data, "services") is not None and _get_ci(data, "name") is None:
        defs = _get_ci(data, "services")
        defs = defs if isinstance(defs, list) else [defs]
    elif isinstance(data, dict) and _get_ci(data, "service") is not None and isinstance(_get_ci(data, "service"), dict):
        defs = [_get_ci(data, "service")]
    elif isinstance(data, list):
        defs = data
    else:
        defs = [data]
    if not defs or not all(isinstance(d, dict) for d in defs):
        raise CLIError(f"{path} holds no service definition: expected {{\"service\": {{\"name\": ..}}}}")
    return defs


def services_register(argv: list[str]) -> int:
    parser = _parser("lictor services register", "Register services with the local agent from FILEs or flags.")
    parser.add_argument("files", nargs="*", metavar="FILE", help="JSON service definition(s); - for stdin")
    parser.add_argument("-name", "--name", default=None)
    parser.add_argument("-id", "--id", dest="id", default=None)
    parser.add_argument("-address", "--address", default=None)
    parser.add_argument("-port", "--port", type=int, default=None)
    parser.add_argument("-tag", "--tag", action="append", default=[])
    parser.add_argument("-meta", "--meta", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.files and args.name:
        raise CLIError("give either FILEs or -name, not both", EXIT_USAGE)
    if not args.files and not args.name:
        raise CLIError("nothing to register: give a service definition FILE or -name NAME", EXIT_USAGE)
    if args.files:
        defs = [d for path in args.files for d in _service_definitions(path)]
    else:
        svc: dict[str, Any] = {"Name": args.name}
        if args.id:
            svc["ID"] = args.id
        if args.address:
            svc["Address"] = args.address
        if args.port is not None:
            svc["Port"] = args.port
        if args.tag:
            svc["Tags"] = args.tag
        if args.meta:
            svc["Meta"] = _kv_pairs(args.meta, "-meta")
        defs = [svc]
    registered = []
    for svc in defs:
        name = _get_ci(svc, "name") or "?"
        try:
            _api(args, "PUT", "/v1/agent/service/register", json_body=svc)
        except CLIError as exc:
            raise CLIError(f"registering service {name!r} failed: {exc}", exc.code) from None
        registered.append({"ID": _get_ci(svc, "id") or name, "Name": name})
        if args.format != "json":
            print(f"Registered service: {name}")
    if args.format == "json":
        _print_json(registered)
    return EXIT_OK


def services_deregister(argv: list[str]) -> int:
    parser = _parser("lictor services deregister", "Deregister services from the local agent by -id or FILE.")
    parser.add_argument("files", nargs="*", metavar="FILE")
    parser.add_argument("-id", "--id", dest="id", default=None)
    args = parser.parse_args(argv)
    if bool(args.files) == bool(args.id):
        raise CLIError("give either -id SERVICE_ID or the service definition FILE(s)", EXIT_USAGE)
    ids = [args.id] if args.id else [str(_get_ci(d, "id") or _get_ci(d, "name")) for p in args.files
                                     for d in _service_definitions(p)]
    for sid in ids:
        resp = _api(args, "PUT", f"/v1/agent/service/deregister/{quote(sid, safe='')}")
        if resp.status_code == 404:
            raise CLIError(f"service {sid!r} not found on this agent: pass the service ID, not its name "
                           "(`lictor catalog services -node NODE` lists them)", EXIT_NEGATIVE)
        if args.format != "json":
            print(f"Deregistered service: {sid}")
    if args.format == "json":
        _print_json([{"ID": s} for s in ids])
    return EXIT_OK


def cmd_services(argv: list[str]) -> int:
    return _subcommand(argv, {"register": services_register, "deregister": services_deregister},
                       "lictor services register FILE... | deregister -id ID | deregister FILE...")


# -- kv ---------------------------------------------------------------------------------------------


def _key(key: str | None, allow_empty: bool) -> str:
    key = key or ""
    if key.startswith("/"):
        raise CLIError(f"key {key!r} must not begin with '/'", EXIT_USAGE)
    if not key and not allow_empty:
        raise CLIError("a KEY is required", EXIT_USAGE)
    return key


def _decode_value(entry: dict[str, Any]) -> bytes:
    value = entry.get("Value")
    return base64.b64decode(value) if value else b""


def _write_value(data: bytes, as_base64: bool) -> None:
    sys.stdout.flush()
    sys.stdout.buffer.write((base64.b64encode(data) if as_base64 else data) + b"\n")
    sys.stdout.buffer.flush()


def kv_get(argv: list[str]) -> int:
    parser = _parser("lictor kv get", "Read a key (or keys under a prefix).")
    parser.add_argument("key", nargs="?", default="", metavar="KEY")
    parser.add_argument("-recurse", "--recurse", action="store_true", help="every key under the prefix KEY")
    parser.add_argument("-keys", "--keys", action="store_true", help="list key names under the prefix KEY")
    parser.add_argument("-separator", "--separator", default="/", help="with -keys: group keys up to this")
    parser.add_argument("-detailed", "--detailed", action="store_true", help="show index, flags and session")
    parser.add_argument("-base64", "--base64", action="store_true", help="print values base64-encoded")
    args = parser.parse_args(argv)
    key = _key(args.key, allow_empty=args.recurse or args.keys)
    if args.keys:
        params = {"keys": ""} | ({"separator": args.separator} if args.separator else {})
        resp = _api(args, "GET", f"/v1/kv/{_q(key)}", params=params)
        keys = resp.json() if resp.status_code == 200 else []
        if args.format == "json":
            _print_json(keys)
        elif keys:
            print("\n".join(keys))
        return EXIT_OK
    params = {"recurse": ""} if args.recurse else None
    resp = _api(args, "GET", f"/v1/kv/{_q(key)}", params=params)
    if resp.status_code == 404:
        if args.recurse:
            entries: list[dict[str, Any]] = []
        else:
            raise CLIError(f"no key exists at: {key} (list keys with `lictor kv get -keys`)", EXIT_NEGATIVE)
    else:
        entries = resp.json() or []
    if args.format == "json":
        _print_json(entries if args.recurse else entries[0])
        return EXIT_OK
    if args.detailed:
        blocks = []
        for e in entries:
            value = _decode_value(e)
            shown = base64.b64encode(value).decode() if args.base64 else value.decode("utf-8", "replace")
            fields = [("CreateIndex", e.get("CreateIndex")), ("Flags", e.get("Flags", 0)), ("Key", e["Key"]),
                      ("LockIndex", e.get("LockIndex", 0)), ("ModifyIndex", e.get("ModifyIndex")),
                      ("Session", e.get("Session") or "-"), ("Value", shown)]
            width = max(len(f) for f, _ in fields)
            blocks.append("\n".join(f"{f.ljust(width)}  {v}" for f, v in fields))
        print("\n\n".join(blocks))
        return EXIT_OK
    if args.recurse:
        for e in entries:
            sys.stdout.flush()
            sys.stdout.buffer.write(e["Key"].encode() + b":")
            _write_value(_decode_value(e), args.base64)
        return EXIT_OK
    _write_value(_decode_value(entries[0]), args.base64)
    return EXIT_OK


def kv_put(argv: list[str]) -> int:
    parser = _parser("lictor kv put", "Write a value: literal, @FILE, or - for stdin.")
    parser.add_argument("key", metavar="KEY")
    parser.add_argument("value", nargs="?", default=None, metavar="VALUE|@FILE|-")
    parser.add_argument("-flags", "--flags", type=int, default=None, help="opaque unsigned integer stored with the key")
    parser.add_argument("-cas", "--cas", action="store_true", help="check-and-set: needs -modify-index")
    parser.add_argument("-modify-index", "--modify-index", dest="modify_index", type=int, default=None,
                        help="with -cas: write only if the key's ModifyIndex is this (0: only if absent)")
    parser.add_argument("-base64", "--base64", action="store_true", help="VALUE is base64-encoded")
    args = parser.parse_args(argv)
    key = _key(args.key, allow_empty=False)
    if args.cas and args.modify_index is None:
        raise CLIError("-cas needs -modify-index N (0 writes only if the key does not exist)", EXIT_USAGE)
    raw = args.value
    if raw is None:
        data = b""
    elif raw == "-":
        data = sys.stdin.buffer.read()
    elif raw.startswith("@"):
        data = _read_input(raw[1:], "value file")
    else:
        data = raw.encode()
    if args.base64:
        try:
            data = base64.b64decode(data, validate=True)
        except ValueError:
            raise CLIError("-base64 was given but VALUE is not valid base64", EXIT_USAGE) from None
    params: dict[str, Any] = {}
    if args.flags is not None:
        params["flags"] = args.flags
    if args.cas:
        params["cas"] = args.modify_index
    resp = _api(args, "PUT", f"/v1/kv/{_q(key)}", params=params, content=data)
    ok = resp.json() is True
    if args.format == "json":
        _print_json({"Key": key, "Written": ok})
    if not ok:
        raise CLIError(f"did not write to {key}: CAS failed (its ModifyIndex is not {args.modify_index}; "
                       f"read it with `lictor kv get -detailed {key}`)")
    if args.format != "json":
        print(f"Success! Data written to: {key}")
    return EXIT_OK


def kv_delete(argv: list[str]) -> int:
    parser = _parser("lictor kv delete", "Delete a key, or every key under a prefix with -recurse.")
    parser.add_argument("key", nargs="?", default="", metavar="KEY")
    parser.add_argument("-recurse", "--recurse", action="store_true")
    parser.add_argument("-cas", "--cas", action="store_true")
    parser.add_argument("-modify-index", "--modify-index", dest="modify_index", type=int, default=None)
    args = parser.parse_args(argv)
    key = _key(args.key, allow_empty=args.recurse)
    if args.cas and args.modify_index is None:
        raise CLIError("-cas needs -modify-index N", EXIT_USAGE)
    if args.cas and args.recurse:
        raise CLIError("-cas cannot be combined with -recurse", EXIT_USAGE)
    params: dict[str, Any] = {}
    if args.recurse:
        params["recurse"] = ""
    if args.cas:
        params["cas"] = args.modify_index
    resp = _api(args, "DELETE", f"/v1/kv/{_q(key)}", params=params)
    ok = resp.status_code == 200 and resp.json() is not False
    if args.format == "json":
        _print_json({"Key": key, "Deleted": ok})
    if not ok:
        raise CLIError(f"did not delete key {key}: CAS failed (its ModifyIndex is not {args.modify_index}; "
                       f"read it with `lictor kv get -detailed {key}`)")
    if args.format != "json":
        print(f"Success! Deleted keys with prefix: {key}" if args.recurse else f"Success! Deleted key: {key}")
    return EXIT_OK


def cmd_kv(argv: list[str]) -> int:
    return _subcommand(argv, {"get": kv_get, "put": kv_put, "delete": kv_delete},
                       "lictor kv get|put|delete [options] KEY [VALUE]")


# -- intentions -------------------------------------------------------------------------------------


def _intention_pair(args: argparse.Namespace, verb: str) -> tuple[str, str] | str:
    names = args.names
    if len(names) == 2:
        return names[0], names[1]
    if len(names) == 1 and verb in ("get", "delete"):
        return names[0]  # a legacy intention ID
    raise CLIError(f"intention {verb} needs SOURCE and DESTINATION service names"
                   + (" (or an intention ID)" if verb in ("get", "delete") else ""), EXIT_USAGE)


def _fetch_intention(args: argparse.Namespace, target: tuple[str, str] | str) -> dict[str, Any] | None:
    if isinstance(target, str):
        resp = _api(args, "GET", f"/v1/connect/intentions/{quote(target, safe='')}")
    else:
        resp = _api(args, "GET", "/v1/connect/intentions/exact",
                    params={"source": target[0], "destination": target[1]})
    return resp.json() if resp.status_code == 200 else None


def _describe(target: tuple[str, str] | str) -> str:
    return f"with ID {target}" if isinstance(target, str) else f"{target[0]} => {target[1]}"


def intention_create(argv: list[str]) -> int:
    parser = _parser("lictor intention create", "Create an intention allowing or denying SOURCE to DESTINATION.")
    parser.add_argument("names", nargs="*", metavar="SOURCE DESTINATION")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("-allow", "--allow", dest="action", action="store_const", const="allow")
    action.add_argument("-deny", "--deny", dest="action", action="store_const", const="deny")
    parser.add_argument("-description", "--description", default="")
    parser.add_argument("-meta", "--meta", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("-replace", "--replace", action="store_true", help="overwrite an existing intention")
    args = parser.parse_args(argv)
    pair = _intention_pair(args, "create")
    assert isinstance(pair, tuple)
    act = args.action or "allow"
    if not args.replace and _fetch_intention(args, pair) is not None:
        raise CLIError(f"an intention {pair[0]} => {pair[1]} already exists: pass -replace to overwrite it, "
                       f"or delete it with `lictor intention delete {pair[0]} {pair[1]}`")
    body: dict[str, Any] = {"SourceType": "consul", "Action": act, "Description": args.description}
    if args.meta:
        body["Meta"] = _kv_pairs(args.meta, "-meta")
    _api(args, "PUT", "/v1/connect/intentions/exact", params={"source": pair[0], "destination": pair[1]},
         json_body=body)
    if args.format == "json":
        _print_json(_fetch_intention(args, pair))
    else:
        print(f"Created: {pair[0]} => {pair[1]} ({act})")
    return EXIT_OK


def intention_delete(argv: list[str]) -> int:
    parser = _parser("lictor intention delete", "Delete the intention SOURCE => DESTINATION (or by ID).")
    parser.add_argument("names", nargs="*", metavar="SOURCE DESTINATION")
    args = parser.parse_args(argv)
    target = _intention_pair(args, "delete")
    if _fetch_intention(args, target) is None:
        raise CLIError(f"no intention {_describe(target)}: list them with `lictor intention list`", EXIT_NEGATIVE)
    if isinstance(target, str):
        _api(args, "DELETE", f"/v1/connect/intentions/{quote(target, safe='')}")
    else:
        _api(args, "DELETE", "/v1/connect/intentions/exact", params={"source": target[0], "destination": target[1]})
    if args.format == "json":
        _print_json({"Deleted": True})
    else:
        print("Intention deleted.")
    return EXIT_OK


def intention_check(argv: list[str]) -> int:
    parser = _parser("lictor intention check", "May SOURCE connect to DESTINATION? Exit 0 allowed, 2 denied.")
    parser.add_argument("names", nargs="*", metavar="SOURCE DESTINATION")
    args = parser.parse_args(argv)
    pair = _intention_pair(args, "check")
    assert isinstance(pair, tuple)
    result = _api(args, "GET", "/v1/connect/intentions/check",
                  params={"source": pair[0], "destination": pair[1]}).json()
    allowed = bool(result.get("Allowed"))
    if args.format == "json":
        _print_json({"Allowed": allowed})
    else:
        print("Allowed" if allowed else "Denied")
    return EXIT_OK if allowed else EXIT_NEGATIVE


def intention_list(argv: list[str]) -> int:
    parser = _parser("lictor intention list", "List every intention, highest precedence first.")
    parser.add_argument("-filter", "--filter", default=None, help="bexpr filter, as the HTTP API's ?filter=")
    args = parser.parse_args(argv)
    items = _api(args, "GET", "/v1/connect/intentions",
                 params={"filter": args.filter} if args.filter else None).json() or []
    if args.format == "json":
        _print_json(items)
        return EXIT_OK
    if not items:
        print("There are no intentions.")
        return EXIT_OK
    rows = [[i.get("ID") or "", i.get("SourceName", ""), i.get("Action") or ("L7" if i.get("Permissions") else ""),
             i.get("DestinationName", ""), str(i.get("Precedence", ""))] for i in items]
    print(_table(rows, ["ID", "Source", "Action", "Destination", "Precedence"]))
    return EXIT_OK


def intention_get(argv: list[str]) -> int:
    parser = _parser("lictor intention get", "Show the intention SOURCE => DESTINATION (or by ID).")
    parser.add_argument("names", nargs="*", metavar="SOURCE DESTINATION")
    args = parser.parse_args(argv)
    target = _intention_pair(args, "get")
    ixn = _fetch_intention(args, target)
    if ixn is None:
        raise CLIError(f"no intention {_describe(target)}: list them with `lictor intention list`", EXIT_NEGATIVE)
    if args.format == "json":
        _print_json(ixn)
        return EXIT_OK
    fields = [("Source", ixn.get("SourceName", "")), ("Destination", ixn.get("DestinationName", "")),
              ("Action", ixn.get("Action") or ("L7 permissions" if ixn.get("Permissions") else "")),
              ("ID", ixn.get("ID") or ""), ("Precedence", ixn.get("Precedence", "")),
              ("Description", ixn.get("Description") or ""),
              ("Meta", ",".join(f"{k}={v}" for k, v in sorted((ixn.get("Meta") or {}).items()))),
              ("Created At", ixn.get("CreatedAt") or "")]
    width = max(len(f) for f, _ in fields) + 1
    print("\n".join(f"{(f + ':').ljust(width)}  {v}".rstrip() for f, v in fields if v != "" or f in ("Action",)))
    return EXIT_OK


def cmd_intention(argv: list[str]) -> int:
    return _subcommand(argv, {"create": intention_create, "delete": intention_delete, "check": intention_check,
                              "list": intention_list, "get": intention_get},
                       "lictor intention create|delete|check|list|get [options] [SOURCE DESTINATION]")


# -- config entries ---------------------------------------------------------------------------------


def _kind_name(args: argparse.Namespace, need_name: bool = True) -> tuple[str, str]:
    if not args.kind:
        raise CLIError("-kind is required (e.g. service-defaults, proxy-defaults, service-resolver)", EXIT_USAGE)
    if need_name and not args.name:
        raise CLIError("-name is required", EXIT_USAGE)
    return args.kind, getattr(args, "name", None) or ""


def config_write(argv: list[str]) -> int:
    parser = _parser("lictor config write", "Create or update a config entry from a JSON FILE (- for stdin).")
    parser.add_argument("file", metavar="FILE")
    parser.add_argument("-cas", "--cas", action="store_true")
    parser.add_argument("-modify-index", "--modify-index", dest="modify_index", type=int, default=None)
    args = parser.parse_args(argv)
    if args.cas and args.modify_index is None:
        raise CLIError("-cas needs -modify-index N (0 writes only if the entry does not exist)", EXIT_USAGE)
    entry = _load_json(args.file, "config entry")
    if not isinstance(entry, dict):
        raise CLIError(f"config entry {args.file} must be a JSON object with Kind and Name")
    kind, name = _get_ci(entry, "kind"), _get_ci(entry, "name")
    if not kind or not name:
        raise CLIError(f"config entry {args.file} needs both \"Kind\" and \"Name\"")
    params = {"cas": args.modify_index} if args.cas else None
    ok = _api(args, "PUT", "/v1/config", params=params, json_body=entry).json() is True
    if args.format == "json":
        _print_json({"Kind": kind, "Name": name, "Written": ok})
    if not ok:
        raise CLIError(f"did not write config entry {kind}/{name}: CAS failed (its ModifyIndex is not "
                       f"{args.modify_index}; read it with `lictor config read -kind {kind} -name {name}`)")
    if args.format != "json":
        print(f"Config entry written: {kind}/{name}")
    return EXIT_OK


def config_read(argv: list[str]) -> int:
    parser = _parser("lictor config read", "Print one config entry as JSON.")
    parser.add_argument("-kind", "--kind", default=None)
    parser.add_argument("-name", "--name", default=None)
    args = parser.parse_args(argv)
    kind, name = _kind_name(args)
    resp = _api(args, "GET", f"/v1/config/{_q(kind)}/{_q(name)}")
    if resp.status_code == 404:
        raise CLIError(f"config entry {kind}/{name} not found: list them with `lictor config list -kind {kind}`",
                       EXIT_NEGATIVE)
    _print_json(resp.json())
    return EXIT_OK


def config_list(argv: list[str]) -> int:
    parser = _parser("lictor config list", "List the names of config entries of one kind.")
    parser.add_argument("-kind", "--kind", default=None)
    parser.add_argument("-filter", "--filter", default=None)
    args = parser.parse_args(argv)
    kind, _ = _kind_name(args, need_name=False)
    entries = _api(args, "GET", f"/v1/config/{_q(kind)}",
                   params={"filter": args.filter} if args.filter else None).json() or []
    if args.format == "json":
        _print_json(entries)
    elif entries:
        print("\n".join(sorted(e.get("Name", "") for e in entries)))
    return EXIT_OK


def config_delete(argv: list[str]) -> int:
    parser = _parser("lictor config delete", "Delete a config entry.")
    parser.add_argument("-kind", "--kind", default=None)
    parser.add_argument("-name", "--name", default=None)
    parser.add_argument("-cas", "--cas", action="store_true")
    parser.add_argument("-modify-index", "--modify-index", dest="modify_index", type=int, default=None)
    args = parser.parse_args(argv)
    kind, name = _kind_name(args)
    if args.cas and args.modify_index is None:
        raise CLIError("-cas needs -modify-index N", EXIT_USAGE)
    resp = _api(args, "DELETE", f"/v1/config/{_q(kind)}/{_q(name)}",
                params={"cas": args.modify_index} if args.cas else None)
    ok = resp.status_code == 200 and resp.json() is not False
    if args.format == "json":
        _print_json({"Kind": kind, "Name": name, "Deleted": ok})
    if not ok:
        raise CLIError(f"did not delete config entry {kind}/{name}: CAS failed (its ModifyIndex is not "
                       f"{args.modify_index})")
    if args.format != "json":
        print(f"Config entry deleted: {kind}/{name}")
    return EXIT_OK


def cmd_config(argv: list[str]) -> int:
    return _subcommand(argv, {"write": config_write, "read": config_read, "list": config_list,
                              "delete": config_delete},
                       "lictor config write FILE | read|delete -kind K -name N | list -kind K")


# -- connect ----------------------------------------------------------------------------------------


def ca_get_config(argv: list[str]) -> int:
    args = _parser("lictor connect ca get-config", "Print the Connect CA configuration as JSON.").parse_args(argv)
    _print_json(_api(args, "GET", "/v1/connect/ca/configuration").json())
    return EXIT_OK


def ca_set_config(argv: list[str]) -> int:
    parser = _parser("lictor connect ca set-config", "Replace the Connect CA configuration (may rotate the root).")
    parser.add_argument("-config-file", "--config-file", dest="config_file", default=None,
                        help='JSON {"Provider": "consul", "Config": {...}}; - for stdin')
    parser.add_argument("-force-without-cross-signing", "--force-without-cross-signing", dest="force",
                        action="store_true")
    args = parser.parse_args(argv)
    if not args.config_file:
        raise CLIError("-config-file FILE is required (see `lictor connect ca get-config` for the shape)",
                       EXIT_USAGE)
    body = _load_json(args.config_file, "CA configuration")
    if not isinstance(body, dict):
        raise CLIError(f"CA configuration {args.config_file} must be a JSON object with Provider and Config")
    if args.force:
        body["ForceWithoutCrossSigning"] = True
    _api(args, "PUT", "/v1/connect/ca/configuration", json_body=body, timeout=120.0)
    if args.format == "json":
        _print_json({"Updated": True})
    else:
        print("Configuration updated!")
    return EXIT_OK


def connect_proxy(argv: list[str]) -> int:
    try:
        from lictor.agent.proxy.cli import main as proxy_main
    except ImportError as exc:
        if exc.name and not "lictor.agent.proxy.cli".startswith(exc.name):
            raise  # the proxy exists but one of its own imports is broken: show the real error
        raise CLIError("`connect proxy` is not available in this build: lictor.agent.proxy is not installed "
                       f"({exc}); install a lictor release that includes the sidecar proxy") from None
    token = os.environ.get("LICTOR_HTTP_TOKEN")
    if token and not any(a.lstrip("-").split("=")[0] == "token" for a in argv):
        argv = ["-token", token, *argv]  # the same token precedence as every other command
    return int(proxy_main(argv) or 0)


def cmd_connect(argv: list[str]) -> int:
    if argv and argv[0] == "ca":
        return _subcommand(argv[1:], {"get-config": ca_get_config, "set-config": ca_set_config},
                           "lictor connect ca get-config | set-config -config-file FILE")
    return _subcommand(argv, {"proxy": connect_proxy}, "lictor connect ca get-config|set-config | proxy [options]")


# -- snapshot ---------------------------------------------------------------------------------------


def _inspect_snapshot(data: bytes) -> dict[str, Any] | None:
    """Check a snapshot's integrity and return its metadata; None when the format is not one we know.

    Lictor's own format is the JSON `GET /v1/snapshot` returns ({"Format": "lictor-snapshot", "Version",
    "Index", "State"}); Consul's is a gzip'd tar (meta.json, state.bin, SHA256SUMS), checked against its sums.
    A recognisably corrupt file raises CLIError."""
    corrupt = "the snapshot is corrupt ({}): take a new one with `lictor snapshot save`"
    if data.lstrip()[:1] == b"{":
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CLIError(corrupt.format(f"invalid JSON: {exc}")) from None
        if not isinstance(doc, dict) or doc.get("Format") != "lictor-snapshot":
            raise CLIError(corrupt.format("JSON, but not a lictor snapshot"))
        state = doc.get("State")
        if not isinstance(state, dict):
            raise CLIError(corrupt.format("no State"))
        return {"Format": "lictor-snapshot", "Version": doc.get("Version"), "Index": doc.get("Index"),
                "Size": len(data), "Tables": ",".join(sorted(state))}
    if data[:2] != b"\x1f\x8b":
        return None
    try:
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data)), mode="r:") as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise CLIError(corrupt.format(exc)) from None
    if "SHA256SUMS" not in files:
        return None
    for line in files["SHA256SUMS"].decode().splitlines():
        if not line.strip():
            continue
        digest, _, name = line.strip().partition("  ")
        if name not in files or hashlib.sha256(files[name]).hexdigest() != digest:
            raise CLIError(corrupt.format(f"checksum mismatch for {name!r}"))
    meta = json.loads(files.get("meta.json", b"{}") or b"{}")
    meta.setdefault("Format", "consul-archive")
    meta.setdefault("Size", len(files.get("state.bin", b"")))
    return meta


def snapshot_save(argv: list[str]) -> int:
    parser = _parser("lictor snapshot save", "Save a point-in-time snapshot of the servers' state to FILE.")
    parser.add_argument("file", metavar="FILE")
    parser.add_argument("-stale", "--stale", action="store_true", help="let any server answer, not the leader")
    args = parser.parse_args(argv)
    base = http_addr(args.http_addr)
    target = Path(args.file)
    partial = target.with_name(target.name + ".part")
    path = "/v1/snapshot"
    try:
        partial.open("wb").close()  # fail before asking the servers for anything
    except OSError as exc:
        raise CLIError(f"cannot write {partial}: {exc.strerror or exc}: check the path and permissions") from None
    try:
        with httpx.Client(timeout=httpx.Timeout(30.0, read=600.0), **tls_kwargs()) as client:
            request = client.build_request("GET", base + path, headers=_headers(args),
                                           params={"stale": ""} if args.stale else None)
            resp = client.send(request, stream=True)
            try:
                if resp.status_code >= 400:
                    resp.read()
                    _check(args, "GET", path, resp)
                    raise CLIError(f"GET {path} failed: {resp.status_code} {resp.text.strip()}")
                total = int(resp.headers.get("content-length") or 0) or None
                progress = Progress(f"Saving snapshot from {base}", total)
                try:
                    with open(partial, "wb") as out:
                        for chunk in resp.iter_bytes(256 * 1024):
                            out.write(chunk)
                            progress.advance(len(chunk))
                except OSError as exc:
                    raise CLIError(f"cannot write {partial}: {exc.strerror or exc}: check the path and free space"
                                   ) from None
                progress.finish()
            finally:
                resp.close()
    except httpx.ConnectError as exc:
        partial.unlink(missing_ok=True)
        raise _unreachable(base, exc) from None
    except httpx.HTTPError as exc:
        partial.unlink(missing_ok=True)
        raise CLIError(f"saving the snapshot failed midway: {exc}; retry") from None
    except CLIError:
        partial.unlink(missing_ok=True)
        raise
    try:
        data = partial.read_bytes()
        if not data:
            raise CLIError("the agent returned an empty snapshot: check the servers' logs and retry")
        meta = _inspect_snapshot(data)
    except CLIError:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)
    index = (meta or {}).get("Index") or resp.headers.get("x-consul-index", "?")
    if args.format == "json":
        _print_json({"File": str(target), "Index": index, "Size": len(data), "Verified": meta is not None})
    else:
        print(f"Saved and verified snapshot to index {index}" if meta is not None
              else f"Saved snapshot to index {index}")
    return EXIT_OK


def snapshot_restore(argv: list[str]) -> int:
    parser = _parser("lictor snapshot restore", "Restore the servers' state from a snapshot FILE. Destructive.")
    parser.add_argument("file", metavar="FILE")
    args = parser.parse_args(argv)
    data = _read_input(args.file, "snapshot")
    if not data:
        raise CLIError(f"snapshot {args.file} is empty: take one with `lictor snapshot save`")
    _inspect_snapshot(data)  # refuse a corrupt archive before it reaches the servers
    base = http_addr(args.http_addr)
    progress = Progress(f"Restoring snapshot to {base}", len(data))

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(data), 256 * 1024):
            chunk = data[start:start + 256 * 1024]
            progress.advance(len(chunk))
            yield chunk

    path = "/v1/snapshot"
    try:
        with httpx.Client(timeout=httpx.Timeout(30.0, read=600.0), **tls_kwargs()) as client:
            resp = client.put(base + path, content=chunks(),
                              headers=_headers(args) | {"Content-Length": str(len(data)),
                                                        "Content-Type": "application/octet-stream"})
    except httpx.ConnectError as exc:
        raise _unreachable(base, exc) from None
    except httpx.HTTPError as exc:
        raise CLIError(f"restoring the snapshot failed: {exc}; the servers may be mid-restore: "
                       "check their logs before retrying") from None
    _check(args, "PUT", path, resp)
    if resp.status_code == 404:
        raise CLIError(f"PUT {path} failed: 404 {resp.text.strip()}")
    progress.finish()
    if args.format == "json":
        _print_json({"Restored": True, "Size": len(data)})
    else:
        print("Restored snapshot")
    return EXIT_OK


def snapshot_inspect(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lictor snapshot inspect", allow_abbrev=False,
                                     description="Check a snapshot file's checksums and show its metadata.")
    parser.add_argument("file", metavar="FILE")
    parser.add_argument("-format", "--format", dest="format", choices=["table", "json"], default="table")
    args = parser.parse_args(argv)
    data = _read_input(args.file, "snapshot")
    meta = _inspect_snapshot(data)
    if meta is None:
        raise CLIError(f"{args.file} is not a snapshot (neither lictor's JSON nor Consul's archive): "
                       "take one with `lictor snapshot save`")
    if args.format == "json":
        _print_json(meta)
        return EXIT_OK
    keys = [k for k in ("Format", "ID", "Version", "Index", "Term", "Size", "Tables") if k in meta]
    print(_table([[k, str(meta[k])] for k in keys], ["Field", "Value"]))
    return EXIT_OK


def cmd_snapshot(argv: list[str]) -> int:
    return _subcommand(argv, {"save": snapshot_save, "restore": snapshot_restore, "inspect": snapshot_inspect},
                       "lictor snapshot save|restore|inspect FILE")


# -- operator (adds `raft wait-leader` to cli.cmd_operator) -----------------------------------------


def _parse_seconds(text: str) -> float:
    from lictor.durations import DurationError, parse_duration

    try:
        return float(text) if text.replace(".", "", 1).isdigit() else parse_duration(text)
    except DurationError:
        raise CLIError(f"invalid duration {text!r}: use a Go duration such as 30s or 2m", EXIT_USAGE) from None


def wait_leader(argv: list[str]) -> int:
    parser = _parser("lictor operator raft wait-leader", "Wait until the cluster has a leader; print its address.")
    parser.add_argument("-timeout", "--timeout", default="60s")
    args = parser.parse_args(argv)
    timeout = _parse_seconds(args.timeout)
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    last_error = ""
    announced = False
    tty = sys.stderr.isatty()
    while True:
        try:
            resp = _api(args, "GET", "/v1/status/leader", timeout=5.0)
            leader = resp.json() if resp.status_code == 200 else ""
            last_error = "" if leader else "no leader elected yet"
        except CLIError as exc:
            if "permission denied" in str(exc):
                raise
            leader, last_error = "", str(exc)
        if leader:
            if announced:
                print(("\r" if tty else "") + f"Leader elected after {time.monotonic() - started:.1f}s",
                      file=sys.stderr)
            if args.format == "json":
                _print_json({"Leader": leader})
            else:
                print(f"Leader: {leader}")
            return EXIT_OK
        if time.monotonic() >= deadline:
            if announced and tty:
                print(file=sys.stderr)
            raise CLIError(f"no leader after {timeout:.0f}s ({last_error}): check that a quorum of servers is "
                           "running and can reach each other (`lictor members`, `lictor operator raft list-peers`)")
        if tty:
            print(f"\rWaiting for a cluster leader... {time.monotonic() - started:.0f}s", end="",
                  file=sys.stderr, flush=True)
        elif not announced:
            print("Waiting for a cluster leader...", file=sys.stderr, flush=True)
        announced = True
        time.sleep(0.25)


def cmd_operator_extra(argv: list[str]) -> int:
    if argv[:2] == ["raft", "wait-leader"]:
        return wait_leader(argv[2:])
    if argv[:2] in (["raft", "list-peers"], ["raft", "remove-peer"]):
        return cmd_operator(argv)
    return _usage("lictor operator raft list-peers | remove-peer -address HOST:PORT | wait-leader [-timeout 60s]")


# -- watch ------------------------------------------------------------------------------------------

WATCH_TYPES = ("key", "keyprefix", "service", "services", "nodes", "checks")


def _watch_query(args: argparse.Namespace) -> tuple[str, dict[str, Any], Callable[[httpx.Response], Any]]:
    """Path, params and result extractor for one watch type."""

    def body_or(default: Any) -> Callable[[httpx.Response], Any]:
        return lambda r: (r.json() if r.content else default) if r.status_code == 200 else default

    if args.type == "key":
        if not args.key:
            raise CLIError("-type key needs -key KEY", EXIT_USAGE)
        return f"/v1/kv/{_q(args.key)}", {}, lambda r: (r.json() or [None])[0] if r.status_code == 200 else None
    if args.type == "keyprefix":
        if args.prefix is None:
            raise CLIError("-type keyprefix needs -prefix PREFIX", EXIT_USAGE)
        return f"/v1/kv/{_q(args.prefix)}", {"recurse": ""}, body_or([])
    if args.type == "service":
        if not args.service:
            raise CLIError("-type service needs -service NAME", EXIT_USAGE)
        params: dict[str, Any] = {"tag": args.tag} if args.tag else {}
        if args.passingonly:
            params["passing"] = ""
        return f"/v1/health/service/{_q(args.service)}", params, body_or([])
    if args.type == "services":
        return "/v1/catalog/services", {}, body_or({})
    if args.type == "nodes":
        return "/v1/catalog/nodes", {}, body_or([])
    if args.service:
        return f"/v1/health/checks/{_q(args.service)}", {}, body_or([])
    return f"/v1/health/state/{args.state or 'any'}", {}, body_or([])


def cmd_watch(argv: list[str]) -> int:
    parser = _parser("lictor watch", "Watch a view with blocking queries; print its JSON (or run HANDLER with "
                     "the JSON on stdin) on every change.")
    parser.add_argument("-type", "--type", dest="type", choices=WATCH_TYPES, default=None)
    parser.add_argument("-key", "--key", default=None)
    parser.add_argument("-prefix", "--prefix", default=None)
    parser.add_argument("-service", "--service", default=None)
    parser.add_argument("-tag", "--tag", action="append", default=[])
    parser.add_argument("-passingonly", "--passingonly", action="store_true")
    parser.add_argument("-state", "--state", default=None, choices=["any", "passing", "warning", "critical"])
    parser.add_argument("-wait", "--wait", default="5m", help="longest blocking query (Go duration)")
    parser.add_argument("-count", "--count", type=int, default=0,
                        help="exit 0 after this many changes (0: until Ctrl-C); not in Consul")
    parser.add_argument("-once", "--once", action="store_true", help="same as -count 1")
    parser.add_argument("handler", nargs=argparse.REMAINDER, metavar="-- HANDLER [ARGS]")
    args = parser.parse_args(argv)
    if not args.type:
        raise CLIError(f"-type is required: one of {', '.join(WATCH_TYPES)}", EXIT_USAGE)
    handler = [a for a in args.handler]
    if handler and handler[0] == "--":
        handler = handler[1:]
    count = 1 if args.once else max(args.count, 0)
    path, params, extract = _watch_query(args)
    wait = _parse_seconds(args.wait)
    index, last, fired, failures = 0, object(), 0, 0
    try:
        while True:
            query = dict(params)
            if index:
                query |= {"index": index, "wait": f"{int(wait)}s"}
            try:
                resp = _api(args, "GET", path, params=query, timeout=wait + wait / 16 + 15)
            except CLIError as exc:
                if fired == 0 and failures == 0 and index == 0:
                    raise  # nothing worked yet: the agent is not there, or the query is wrong
                failures += 1
                delay = min(2.0 ** min(failures, 5), 30.0)
                print(f"watch: {exc}; retrying in {delay:.0f}s", file=sys.stderr, flush=True)
                time.sleep(delay)
                continue
            failures = 0
            try:
                new_index = int(resp.headers.get("x-consul-index", "0"))
            except ValueError:
                new_index = 0
            result = extract(resp)
            # A smaller index means the servers' state was reset (restore, new cluster): start over.
            index = 0 if new_index < index else new_index
            if result == last:
                if not new_index:
                    time.sleep(1.0)  # no blocking support on this path: poll, gently
                continue
            last = result
            fired += 1
            payload = json.dumps(result)
            if handler:
                env = os.environ | {"CONSUL_INDEX": str(new_index), "LICTOR_INDEX": str(new_index)}
                cmd: str | list[str] = handler[0] if len(handler) == 1 else handler
                proc = subprocess.run(cmd, shell=len(handler) == 1, input=payload.encode() + b"\n", env=env,
                                      check=False)
                if proc.returncode != 0:
                    print(f"watch: handler exited with {proc.returncode}", file=sys.stderr, flush=True)
            else:
                print(payload, flush=True)
            if count and fired >= count:
                return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK


# -- registration -----------------------------------------------------------------------------------


def _guarded(func: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
    """A reply that is not JSON (something else on that port), and Ctrl-C, end in one line, not a traceback."""

    def run(argv: list[str]) -> int:
        try:
            return func(argv)
        except json.JSONDecodeError as exc:
            raise CLIError(f"the reply was not JSON ({exc.msg}): is -http-addr pointing at a lictor or Consul "
                           "agent's HTTP port?") from None
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130

    run.__doc__ = func.__doc__
    return run


for _name, _func in {
    "version": cmd_version,
    "leave": cmd_leave,
    "reload": cmd_reload,
    "catalog": cmd_catalog,
    "services": cmd_services,
    "kv": cmd_kv,
    "intention": cmd_intention,
    "config": cmd_config,
    "connect": cmd_connect,
    "snapshot": cmd_snapshot,
    "operator": cmd_operator_extra,
    "watch": cmd_watch,
}.items():
    register_command(_name, _guarded(_func))

__all__ = ["EXIT_ERROR", "EXIT_NEGATIVE", "EXIT_OK", "EXIT_USAGE", "Progress"]
