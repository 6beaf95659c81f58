"""Agent flags (single and double dash) and JSON config files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lictor.config import ConfigError, parse_agent_args


def test_single_and_double_dash_flags_mean_the_same() -> None:
    single = parse_agent_args(["-server", "-bootstrap-expect", "3", "-node", "s1", "-data-dir", "/tmp/x",
                               "-http-port", "8510", "-retry-join", "a:1", "-retry-join", "b:2", "-encrypt", "k"])
    double = parse_agent_args(["--server", "--bootstrap-expect", "3", "--node", "s1", "--data-dir", "/tmp/x",
                               "--http-port", "8510", "--retry-join", "a:1", "--retry-join", "b:2", "--encrypt", "k"])
    assert single == double
    assert single.server and single.bootstrap_expect == 3 and single.retry_join == ["a:1", "b:2"]
    assert single.http_addr == "127.0.0.1:8510"


def test_config_file_then_flags_win(tmp_path: Path) -> None:
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"node_name": "from-file", "datacenter": "east", "ports": {"http": 9500, "dns": 9600},
                                "retry_join": ["x:1"], "data_dir": str(tmp_path), "dns_config": {"only_passing": True},
                                "heartbeat_interval": "3s"}))
    config = parse_agent_args(["-config-file", str(path), "-node", "from-flag"])
    assert config.node == "from-flag" and config.datacenter == "east"
    assert config.http_port == 9500 and config.dns_port == 9600 and config.only_passing
    assert config.heartbeat_interval == 3.0 and config.retry_join == ["x:1"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["-server", "-data-dir", "/tmp/x"], "-encrypt"),
        (["-node", "x"], "-data-dir"),
        (["-dev", "-http-port", "eighty"], "http-port"),
        (["-dev", "-heartbeat-interval", "soon"], "heartbeat-interval"),
        (["-dev", "-default-intention-policy", "maybe"], "allow or deny"),
        (["-dev", "-blocking-coalesce", "soon"], "blocking-coalesce"),
        (["-dev", "-blocking-coalesce", "1m"], "between 0 and 10s"),
    ],
)
def test_bad_flags_name_the_problem(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_agent_args(argv)


def test_bad_config_files_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match="bad.json"):
        parse_agent_args(["-config-file", str(bad), "-dev"])
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"frobnicate": 1}')
    with pytest.raises(ConfigError, match="frobnicate"):
        parse_agent_args(["-config-file", str(unknown), "-dev"])


def test_blocking_coalesce_defaults_to_50ms_and_is_set_by_flag_or_file(tmp_path: Path) -> None:
    assert parse_agent_args(["-dev"]).blocking_coalesce == 0.05
    assert parse_agent_args(["-dev", "-blocking-coalesce", "0"]).blocking_coalesce == 0.0
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"blocking_coalesce": "200ms"}))
    assert parse_agent_args(["-dev", "-config-file", str(path)]).blocking_coalesce == 0.2
    path.write_text(json.dumps({"blocking_coalesce": -1}))
    with pytest.raises(ConfigError, match="blocking-coalesce"):
        parse_agent_args(["-dev", "-config-file", str(path)])
