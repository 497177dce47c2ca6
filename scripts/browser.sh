#!/usr/bin/env bash
# Makes sure headless Chromium and chromedriver are installed (the dashboard's browser
# tests drive them). Installs the OS packages with apt-get when they are missing and we
# are root; otherwise says what to install.
set -euo pipefail

if command -v chromedriver >/dev/null 2>&1 && { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1; }; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium and chromium-driver (the dashboard's browser tests use them)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq chromium chromium-driver >/dev/null
    exit 0
fi
echo "error: the dashboard's browser tests need Chromium and chromedriver: install the chromium and chromium-driver packages (e.g. sudo apt-get install chromium chromium-driver) and run this again" >&2
exit 1
