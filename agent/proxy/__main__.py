"""`python -m lictor.agent.proxy -sidecar-for web -http-addr 127.0.0.1:8500`."""

from __future__ import annotations

import sys

from lictor.agent.proxy.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
