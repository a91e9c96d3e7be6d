#!/usr/bin/env bash
# What the browser tests (tests/test_browser.py, the widget page in tests/test_examples.py) need: a Chromium and
# Playwright's Python package. Playwright only drives that Chromium: `playwright install` (its own browser
# download) is never run. Idempotent: does nothing that is already done.
#
# The browser is, in this order: $CHROMIUM (a path or a command name), else the first of chromium,
# chromium-browser, google-chrome, google-chrome-stable on PATH. Only when none is found is Debian/Ubuntu's
# chromium installed with apt-get (root, or sudo), without recommended packages; apt's output goes to
# build/apt.log ($APT_LOG), not to the terminal.
#   usage: scripts/install_browser_deps.sh      (PY=path/to/python: the interpreter that gets playwright)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
PLAYWRIGHT_SPEC="${PLAYWRIGHT_SPEC:-playwright==1.65.2}"
APT_LOG="${APT_LOG:-build/apt.log}"
BROWSERS="chromium chromium-browser google-chrome google-chrome-stable"

find_chromium() {
    if [ -n "${CHROMIUM:-}" ]; then
        command -v "$CHROMIUM" || return 1
        return 0
    fi
    local name
    for name in $BROWSERS; do
        if command -v "$name"; then return 0; fi
    done
    return 1
}

apt_install_chromium() {
    if ! command -v apt-get >/dev/null; then
        echo "install_browser_deps: no Chromium found ($BROWSERS) and no apt-get to install one:" >&2
        echo "  install Chromium or Chrome yourself and put it on PATH, or set CHROMIUM=/path/to/chromium" >&2
        exit 1
    fi
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null; then
            echo "install_browser_deps: installing Chromium with apt-get needs root (or sudo);" \
                 "or set CHROMIUM=/path/to/chromium" >&2
            exit 1
        fi
        sudo="sudo"
    fi
    mkdir -p "$(dirname "$APT_LOG")"
    echo "install_browser_deps: installing chromium with apt-get (--no-install-recommends; log: $APT_LOG)"
    {
        $sudo apt-get update
        # Debian calls the package chromium; Ubuntu's is chromium-browser.
        local package=chromium
        if ! apt-cache show chromium >/dev/null 2>&1; then package=chromium-browser; fi
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "$package"
    } >"$APT_LOG" 2>&1 || {
        echo "install_browser_deps: apt-get failed; the end of $APT_LOG:" >&2
        tail -n 20 "$APT_LOG" >&2
        exit 1
    }
}

if ! browser="$(find_chromium)"; then
    if [ -n "${CHROMIUM:-}" ]; then
        echo "install_browser_deps: CHROMIUM=$CHROMIUM is not an executable or a command on PATH" >&2
        exit 1
    fi
    apt_install_chromium
    browser="$(find_chromium)" || {
        echo "install_browser_deps: apt-get installed chromium but none of $BROWSERS is on PATH" >&2
        exit 1
    }
fi

if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('playwright') != '${PLAYWRIGHT_SPEC#playwright==}')" \
        2>/dev/null; then
    "$PY" -m pip install -q "$PLAYWRIGHT_SPEC"
fi

echo "browser test dependencies: $browser ($("$browser" --version 2>/dev/null || echo "version unknown")), playwright $("$PY" -c \
    'import importlib.metadata as m; print(m.version("playwright"))')"
