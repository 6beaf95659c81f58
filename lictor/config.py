"""Agent configuration: Consul-style flags (`-flag` or `--flag`) and JSON config files.

Flags win over files; files are applied in the order given, and a later file wins.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from dataclasses import dataclass, field, fields
from typing import Any

from lictor.durations import DurationError, parse_duration


@dataclass
class AgentConfig:
    node: str = ""
    datacenter: str = "dc1"
    server: bool = False
    dev: bool = False
    bootstrap_expect: int = 0
    data_dir: str = ""
    bind: str = "127.0.0.1"
    client: str = "127.0.0.1"
    http_port: int = 8500
    raft_port: int = 8300
    dns_port: int = 8600
    retry_join: list[str] = field(default_factory=list)
    retry_interval: float = 1.0
    encrypt: str = ""
    config_dir: list[str] = field(default_factory=list)
    log_level: str = "info"
    domain: str = "consul."
    alt_domain: str = ""
    recursors: list[str] = field(default_factory=list)
    node_ttl: float = 0.0
    service_ttl: dict[str, float] = field(default_factory=dict)
    only_passing: bool = False
    a_record_limit: int = 0
    dev_gateway: bool = False  # -dev only: also run an ingress gateway
    gateway_port: int = 8080
    dns_max_stale: float = 72 * 3600.0  # past this without reaching a server, DNS answers SERVFAIL
    raft_snapshot_threshold: int = 5000
    raft_min_timeout: float = 0.8
    raft_max_timeout: float = 2.0
    write_timeout: float = 7.0
    heartbeat_interval: float = 2.0
    liveness_timeout: float = 10.0
    reconnect_timeout: float = 72 * 3600.0
    ae_interval: float = 60.0
    check_deregister_min: float = 60.0
    enable_script_checks: bool = False
    default_intention_policy: str = "allow"
    leaf_cert_ttl: float = 72 * 3600.0
    managed_proxies: bool = False
    node_meta: dict[str, str] = field(default_factory=dict)
    # ACLs (issue #9)
    acl_enabled: bool = False
    acl_default_policy: str = "deny"
    acl_token: str = ""  # used for requests that carry no token
    acl_agent_token: str = ""  # the agent's own calls: anti-entropy, heartbeats
    acl_initial_management: str = ""  # a management secret known to every server (Consul's initial_management)
    # limits (issue #9); 0 disables a limit
    http_max_body: int = 4 * 1024 * 1024
    http_max_header_bytes: int = 64 * 1024
    http_header_timeout: float = 10.0  # a client must finish sending its request head within this
    http_max_connections: int = 4096
    http_rate_limit: float = 0.0  # requests per second per client IP
    http_rate_burst: int = 0  # 0 = 2 x the rate
    http_max_blocking_per_client: int = 0
    # A blocking query woken within this of its arrival answers at this mark (httpapi.blocking): under
    # churn each watcher gets at most one answer per interval instead of one per write. 0 = off.
    blocking_coalesce: float = 0.05
    dns_rate_limit: float = 0.0  # DNS queries per second per client IP (UDP and TCP together)
    dns_rate_burst: int = 0  # 0 = 2 x the rate
    max_services: int = 0  # services per agent
    max_checks: int = 0  # checks per agent
    # TLS for the HTTP API (issue #9); -1 disables the HTTPS listener (Consul's default)
    https_port: int = -1
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""  # verifies client certs (-verify-incoming) and the servers a client agent calls
    verify_incoming: bool = False
    client_cert: str = ""  # presented to https:// servers; defaults to cert_file
    client_key: str = ""
    verify_outgoing: bool = False  # calls to servers must use HTTPS, verified against ca_file (lictor/tls.py)
    verify_server_hostname: bool = False  # servers' certs must name server.<datacenter>.<domain>

    @property
    def http_addr(self) -> str:
        return f"{self.client}:{self.http_port}"

    @property
    def raft_addr(self) -> str:
        return f"{self.bind}:{self.raft_port}"


# flag name -> (dest, kind); kind: bool, int, str, list, duration
_FLAGS: dict[str, tuple[str, str]] = {
    "node": ("node", "str"),
    "datacenter": ("datacenter", "str"),
    "server": ("server", "bool"),
    "dev": ("dev", "bool"),
    "bootstrap-expect": ("bootstrap_expect", "int"),
    "data-dir": ("data_dir", "str"),
    "bind": ("bind", "str"),
    "client": ("client", "str"),
    "http-port": ("http_port", "int"),
    "raft-port": ("raft_port", "int"),
    "dns-port": ("dns_port", "int"),
    "retry-join": ("retry_join", "list"),
    "join": ("retry_join", "list"),
    "retry-interval": ("retry_interval", "duration"),
    "encrypt": ("encrypt", "str"),
    "config-dir": ("config_dir", "list"),
    "log-level": ("log_level", "str"),
    "domain": ("domain", "str"),
    "alt-domain": ("alt_domain", "str"),
    "recursor": ("recursors", "list"),
    "raft-snapshot-threshold": ("raft_snapshot_threshold", "int"),
    "dns-max-stale": ("dns_max_stale", "duration"),
    "heartbeat-interval": ("heartbeat_interval", "duration"),
    "liveness-timeout": ("liveness_timeout", "duration"),
    "reconnect-timeout": ("reconnect_timeout", "duration"),
    "ae-interval": ("ae_interval", "duration"),
    "check-deregister-min": ("check_deregister_min", "duration"),
    "enable-script-checks": ("enable_script_checks", "bool"),
    "default-intention-policy": ("default_intention_policy", "str"),
    "leaf-cert-ttl": ("leaf_cert_ttl", "duration"),
    "managed-proxies": ("managed_proxies", "bool"),
    "acl-enabled": ("acl_enabled", "bool"),
    "acl-default-policy": ("acl_default_policy", "str"),
    "acl-token": ("acl_token", "str"),
    "acl-agent-token": ("acl_agent_token", "str"),
    "acl-initial-management": ("acl_initial_management", "str"),
    "http-max-body": ("http_max_body", "int"),
    "http-max-header-bytes": ("http_max_header_bytes", "int"),
    "http-header-timeout": ("http_header_timeout", "duration"),
    "http-max-connections": ("http_max_connections", "int"),
    "http-rate-limit": ("http_rate_limit", "float"),
    "http-rate-burst": ("http_rate_burst", "int"),
    "http-max-blocking-per-client": ("http_max_blocking_per_client", "int"),
    "blocking-coalesce": ("blocking_coalesce", "duration"),
    "dns-rate-limit": ("dns_rate_limit", "float"),
    "dns-rate-burst": ("dns_rate_burst", "int"),
    "max-services": ("max_services", "int"),
    "max-checks": ("max_checks", "int"),
    "https-port": ("https_port", "int"),
    "cert-file": ("cert_file", "str"),
    "key-file": ("key_file", "str"),
    "ca-file": ("ca_file", "str"),
    "verify-incoming": ("verify_incoming", "bool"),
    "client-cert": ("client_cert", "str"),
    "client-key": ("client_key", "str"),
    "verify-outgoing": ("verify_outgoing", "bool"),
    "verify-server-hostname": ("verify_server_hostname", "bool"),
}

# JSON config keys (Consul's names) that differ from our field names
_FILE_ALIASES = {
    "node_name": "node",
    "bind_addr": "bind",
    "client_addr": "client",
    "start_join": "retry_join",
    "recursor": "recursors",
}


class ConfigError(ValueError):
    pass


def _coerce(name: str, kind: str, value: Any) -> Any:
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError(value)
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if kind == "duration":
            return parse_duration(value) if isinstance(value, str) else float(value)
        if kind == "list":
            return list(value) if isinstance(value, list) else [str(value)]
        return str(value)
    except (ValueError, TypeError, DurationError):
        raise ConfigError(f"invalid value {value!r} for {name}: expected {kind}") from None


def apply_file(config: AgentConfig, path: str) -> None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be an object")
    known = {f.name for f in fields(AgentConfig)}
    kinds = {dest: kind for dest, kind in _FLAGS.values()}
    for key, value in data.items():
        if key == "ports" and isinstance(value, dict):
            for port_name, dest in (("http", "http_port"), ("https", "https_port"), ("dns", "dns_port"), ("server", "raft_port"), ("raft", "raft_port")):
                if port_name in value:
                    setattr(config, dest, _coerce(f"ports.{port_name}", "int", value[port_name]))
            continue
        if key == "dns_config" and isinstance(value, dict):
            for sub, sub_value in value.items():
                if sub in ("only_passing",):
                    config.only_passing = _coerce(sub, "bool", sub_value)
                elif sub == "max_stale":
                    config.dns_max_stale = _coerce(sub, "duration", sub_value)
                elif sub == "a_record_limit":
                    config.a_record_limit = _coerce(sub, "int", sub_value)
                elif sub == "node_ttl":
                    config.node_ttl = _coerce(sub, "duration", sub_value)
                elif sub == "service_ttl" and isinstance(sub_value, dict):
                    config.service_ttl = {k: _coerce(sub, "duration", v) for k, v in sub_value.items()}
            continue
        dest = _FILE_ALIASES.get(key, key.replace("-", "_"))
        if dest not in known:
            raise ConfigError(f"config file {path}: unknown key {key!r}")
        kind = kinds.get(dest)
        if kind is None:
            current = getattr(config, dest)
            kind = "bool" if isinstance(current, bool) else "int" if isinstance(current, int) else "str"
            if isinstance(current, dict):
                setattr(config, dest, dict(value))
                continue
        setattr(config, dest, _coerce(key, kind, value))


def parse_agent_args(argv: list[str]) -> AgentConfig:
    parser = argparse.ArgumentParser(prog="lictor agent", allow_abbrev=False)
    for flag, (_dest, kind) in _FLAGS.items():
        names = [f"-{flag}", f"--{flag}"]
        if kind == "bool":
            parser.add_argument(*names, dest=flag, nargs="?", const="true", default=None)
        elif kind == "list":
            parser.add_argument(*names, dest=flag, action="append", default=None)
        else:
            parser.add_argument(*names, dest=flag, default=None)
    parser.add_argument("-config-file", "--config-file", dest="config_file", action="append", default=[])
    parser.add_argument("-dev-gateway", "--dev-gateway", dest="dev_gateway", action="store_true")
    parser.add_argument("-gateway-port", "--gateway-port", dest="gateway_port", type=int, default=None)
    args = parser.parse_args(argv)
    config = AgentConfig()
    for path in args.config_file:
        apply_file(config, path)
    config.dev_gateway = args.dev_gateway
    if args.gateway_port is not None:
        config.gateway_port = args.gateway_port
    for flag, (dest, kind) in _FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        coerced = _coerce(f"-{flag}", kind, value)
        if kind == "list":
            coerced = list(getattr(config, dest) or []) + [v for v in coerced if v not in (getattr(config, dest) or [])]
        setattr(config, dest, coerced)
    return finalize(config)


def finalize(config: AgentConfig) -> AgentConfig:
    if config.dev:
        config.server = True
        config.bootstrap_expect = 1
        if config.dev_gateway:
            config.managed_proxies = True  # the gateway reaches services through their sidecars
    if not config.node:
        config.node = socket.gethostname()
    if config.server and not config.dev and config.bootstrap_expect <= 0 and not config.retry_join:
        config.bootstrap_expect = 1
    if not config.dev and not config.data_dir:
        raise ConfigError("-data-dir is required (or use -dev for an in-memory agent)")
    if config.data_dir:
        config.data_dir = os.path.abspath(config.data_dir)
    if config.server and not config.dev and not config.encrypt:
        # Without a key, pysyncobj's Raft port unpickles whatever a stranger sends.
        raise ConfigError("servers need a cluster key: pass -encrypt \"$(lictor keygen)\" (the same on every server)")
    if config.acl_default_policy not in ("allow", "deny"):
        raise ConfigError("-acl-default-policy must be allow or deny")
    if config.default_intention_policy not in ("allow", "deny"):
        raise ConfigError("-default-intention-policy must be allow or deny")
    if config.https_port > 0 and not (config.cert_file and config.key_file):
        raise ConfigError("-https-port needs -cert-file and -key-file")
    if config.verify_incoming and not config.ca_file:
        raise ConfigError("-verify-incoming needs -ca-file (the CA that signs client certificates)")
    if not 0 <= config.blocking_coalesce <= 10:
        raise ConfigError(f"-blocking-coalesce must be between 0 and 10s, not {config.blocking_coalesce!r}s")
    _check_outgoing_tls(config)
    _check_tls_files(config)
    if config.http_port <= 0 and config.https_port <= 0:
        raise ConfigError("both -http-port and -https-port are disabled: the agent would have no API")
    if not config.domain.endswith("."):
        config.domain += "."
    return config


def _check_outgoing_tls(config: AgentConfig) -> None:
    """-verify-outgoing / -verify-server-hostname: refuse combinations that could not work, at startup."""
    if config.verify_server_hostname and not config.verify_outgoing:
        raise ConfigError("-verify-server-hostname needs -verify-outgoing")
    if not config.verify_outgoing:
        return
    if not config.ca_file:
        raise ConfigError("-verify-outgoing needs -ca-file (the CA that signs the servers' certificates)")
    plain = [a for a in config.retry_join if a.startswith("http://")]
    if plain:
        raise ConfigError(f"-verify-outgoing forbids plain HTTP: -retry-join {plain[0]} (use https:// or host:port)")
    if config.server and not config.dev and config.https_port <= 0:
        raise ConfigError("a server with -verify-outgoing needs -https-port: the other servers call it over HTTPS")


def _check_tls_files(config: AgentConfig) -> None:
    """Load the files outgoing calls use now, so a bad path is a one-line error and not a traceback later."""
    if bool(config.client_cert) != bool(config.client_key):
        raise ConfigError("-client-cert and -client-key go together")
    if not (config.ca_file or config.cert_file or config.client_cert):
        return
    import ssl

    from lictor.tls import outgoing_context

    try:
        outgoing_context(config)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS files for outgoing calls (-ca-file, -client-cert/-cert-file): {exc}") from None
