"""`lictor demo` for 60 s: answers through the gateway, shows the canary split and the retries in
its own counters, and leaves no process behind when stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from procs import free_ports

pytestmark = pytest.mark.slow


def pids_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                continue
    return found


def test_demo_runs_splits_retries_and_cleans_up(tmp_path: Path) -> None:
    http_port, dns_port, gateway_port = free_ports(3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lictor.cli", "demo", "-http-port", str(http_port), "-dns-port", str(dns_port),
         "-gateway-port", str(gateway_port), "-rate", "40", "-report-every", "15"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "demo exited early:\n" + "".join(lines)
            lines.append(line)
            if line.startswith("==> processes:"):
                break
        children = [int(p) for p in lines[-1].split(":", 1)[1].split()]
        assert len(children) >= 7
        gateway = f"http://127.0.0.1:{gateway_port}/"
        assert httpx.get(gateway, headers={"Host": "product.localhost"}, timeout=10).json()["service"] == "product"
        order = httpx.get(gateway, headers={"Host": "order.localhost"}, timeout=10)
        assert order.json()["service"] == "order"
        denied = httpx.get(gateway + "pay-directly", headers={"Host": "product.localhost"}, timeout=10).json()
        assert denied["status"] != 200, denied  # product -> payment is denied by intention
        time.sleep(60)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        lines.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    output = "".join(lines)
    final = json.loads(output.split("==> final counters ", 1)[1].splitlines()[0])
    total = final["inventory_v1"] + final["inventory_v2"]
    assert total > 500, final
    assert 5.0 <= final["inventory_v2_share"] <= 15.0, final
    # Payment fails 30 % at the app; retries at the gateway hide most of it.
    assert final["payment_app_failures"] > 20, final
    assert final["payment_ok"] / final["payment_requests"] > 0.9, final
    assert "--> inventory v1" in output  # the periodic counters are printed
    # The sidecars are the agent's children: they get SIGTERM when it exits and need a moment.
    deadline = time.monotonic() + 15
    while True:
        leftovers = [p for p in children if os.path.exists(f"/proc/{p}")]
        leftovers += pids_mentioning(f"127.0.0.1:{http_port}")
        if not leftovers or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not leftovers, f"processes left behind: {leftovers}"
