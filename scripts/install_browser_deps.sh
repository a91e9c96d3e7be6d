#!/usr/bin/env bash
# What the tests need from the system: a Chromium and Playwright's Python package for the browser tests
# (tests/test_browser.py, the widget page in tests/test_examples.py), and curl + jq for the docs' shell examples
# (tests/test_docs.py). Playwright only drives that Chromium: `playwright install` (its own browser download) is
# never run. Idempotent: does nothing that is already done.
#
# The browser is, in this order: $CHROMIUM (a path or a command name), else the first of chromium,
# chromium-browser, google-chrome, google-chrome-stable on PATH. Only what is missing is installed, with
# Debian/Ubuntu's apt-get (root, or sudo), without recommended packages; apt's output goes to build/apt.log
# ($APT_LOG), not to the terminal.
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

apt_install() {  # packages (chromium: Debian's name, or Ubuntu's chromium-browser)
    if ! command -v apt-get >/dev/null; then
        echo "install_browser_deps: missing $*, and no apt-get to install them: install them yourself" \
             "(a Chromium or Chrome on PATH, or CHROMIUM=/path/to/chromium)" >&2
        exit 1
    fi
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null; then
            echo "install_browser_deps: installing $* with apt-get needs root (or sudo);" \
                 "or install them yourself (CHROMIUM=/path/to/chromium for the browser)" >&2
            exit 1
        fi
        sudo="sudo"
    fi
    mkdir -p "$(dirname "$APT_LOG")"
    echo "install_browser_deps: installing $* with apt-get (--no-install-recommends; log: $APT_LOG)"
    {
        $sudo apt-get update
        local packages=() package
        for package in "$@"; do
            # Debian calls the browser chromium; Ubuntu's is chromium-browser.
            if [ "$package" = chromium ] && ! apt-cache show chromium >/dev/null 2>&1; then
                package=chromium-browser
            fi
            packages+=("$package")
        done
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${packages[@]}"
    } >"$APT_LOG" 2>&1 || {
        echo "install_browser_deps: apt-get failed; the end of $APT_LOG:" >&2
        tail -n 20 "$APT_LOG" >&2
        exit 1
    }
}

missing=()
if ! browser="$(find_chromium)"; then
    if [ -n "${CHROMIUM:-}" ]; then
        echo "install_browser_deps: CHROMIUM=$CHROMIUM is not an executable or a command on PATH" >&2
        exit 1
    fi
    missing+=(chromium)
fi
for tool in curl jq; do
    if ! command -v "$tool" >/dev/null; then missing+=("$tool"); fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
fi
if [ -z "${browser:-}" ]; then
    browser="$(find_chromium)" || {
        echo "install_browser_deps: apt-get installed chromium but none of $BROWSERS is on PATH" >&2
        exit 1
    }
fi

if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('playwright') != '${PLAYWRIGHT_SPEC#playwright==}')" \
        2>/dev/null; then
    "$PY" -m pip install -q "$PLAYWRIGHT_SPEC"
fi

echo "test dependencies: $browser ($("$browser" --version 2>/dev/null || echo "version unknown")), playwright $("$PY" -c \
    'import importlib.metadata as m; print(m.version("playwright"))'), $(curl --version | head -n 1 | cut -d' ' -f1-2), $(jq --version)"
