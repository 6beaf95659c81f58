#!/usr/bin/env bash
# Installs everything Lictor and its tests need on a fresh Debian machine with Python 3.11+:
# system tools used as real clients in tests (dig, openssl, curl), then a virtualenv with the package.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v dig >/dev/null 2>&1 || need_apt+=(bind9-dnsutils)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
if [ "${#need_apt[@]}" -gt 0 ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> apt-get install ${need_apt[*]}"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    else
        echo "warning: missing ${need_apt[*]} (install them; some tests use them as real clients)" >&2
    fi
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$PYTHON" -m venv .venv
fi
echo "==> pip install -e .[test]"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
