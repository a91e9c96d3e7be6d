#!/usr/bin/env bash
# What the browser end-to-end test (tests/test_browser.py) needs: Debian's Chromium at /usr/bin/chromium and
# Playwright's Python package. Playwright only drives the system's Chromium, so `playwright install` (which
# downloads a browser) is never run. Idempotent: does nothing that is already done.
#   usage: scripts/install_browser_deps.sh            (PY=path/to/python to use another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
PLAYWRIGHT_SPEC="${PLAYWRIGHT_SPEC:-playwright==1.65.2}"

if [ ! -x /usr/bin/chromium ]; then
    if ! command -v apt-get >/dev/null; then
        echo "install_browser_deps: no apt-get here; install Chromium at /usr/bin/chromium by hand" >&2
        exit 1
    fi
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium
fi

if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('playwright') != '${PLAYWRIGHT_SPEC#playwright==}')" \
        2>/dev/null; then
    "$PY" -m pip install -q "$PLAYWRIGHT_SPEC"
fi

echo "browser test dependencies: $(/usr/bin/chromium --version 2>/dev/null), playwright $("$PY" -c \
    'import importlib.metadata as m; print(m.version("playwright"))')"
