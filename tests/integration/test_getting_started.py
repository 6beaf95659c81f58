"""Walk docs/getting-started.md command by command against a real agent and check its outputs.

Blocks fenced as ```console hold `$ command` lines followed by the output the guide promises;
each output line is a glob (`*` matches anything) and must match the command's output line by
line. Blocks fenced as ```json file=NAME are written to NAME first. The guide's ports (8500, 8600)
are swapped for free ones so the test never collides with anything.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import AgentProc, free_ports

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "getting-started.md"
BLOCK = re.compile(r"```(console|json file=(\S+))\n(.*?)```", re.S)

pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="dig (bind9-dnsutils) is not installed")


def steps() -> list[tuple[str, str, list[str]]]:
    """(kind, command-or-filename, expected lines) in document order."""
    out: list[tuple[str, str, list[str]]] = []
    for match in BLOCK.finditer(GUIDE.read_text()):
        if match.group(2):
            out.append(("file", match.group(2), [match.group(3)]))
            continue
        command: str | None = None
        expected: list[str] = []
        for line in match.group(3).splitlines():
            if line.startswith("$ "):
                if command is not None:
                    out.append(("run", command, expected))
                command, expected = line[2:], []
            elif command is not None:
                expected.append(line)
        if command is not None:
            out.append(("run", command, expected))
    return out


def test_every_command_in_the_guide_does_what_it_says(tmp_path: Path) -> None:
    http_port, dns_port = free_ports(2)
    agent = AgentProc("guide", http_port, ["-dev", "-http-port", str(http_port), "-dns-port", str(dns_port)],
                      tmp_path / "agent.log", dns_port=dns_port)
    agent.start()
    try:
        agent.wait_ready()
        env = dict(os.environ, LICTOR_HTTP_ADDR=f"127.0.0.1:{http_port}",
                   PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
        ran = 0
        for kind, what, expected in steps():
            if kind == "file":
                (tmp_path / what).write_text(expected[0])
                continue
            command = what.replace("8500", str(http_port)).replace("8600", str(dns_port))
            # DNS follows health changes within a second, not instantly: a read-only dig may be
            # asked again for up to 2 s; commands with effects run exactly once.
            deadline = time.monotonic() + (2.0 if command.startswith("dig ") else 0.0)
            while True:
                result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                                        text=True, timeout=30)
                got = result.stdout.rstrip("\n").splitlines()
                matched = len(got) == len(expected) and all(
                    fnmatch.fnmatchcase(line.rstrip(), want.rstrip()) for want, line in zip(expected, got, strict=True)
                )
                if matched or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert matched, f"$ {what}\nexpected:\n{expected}\ngot:\n{got}\n{result.stderr}"
            ran += 1
        assert ran >= 14
    finally:
        agent.kill()
