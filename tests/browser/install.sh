#!/usr/bin/env bash
# What the browser tests need beyond pip: Debian's Chromium and a CJK font (apt, when missing and
# when we may install), and axe-core from npm into a cache outside the repository.
# Usage: tests/browser/install.sh [--apt]   (axe-core goes to $CODEPLAN_BROWSER_DIR or ~/.cache/codeplan-browser)
set -euo pipefail
DIR="${CODEPLAN_BROWSER_DIR:-$HOME/.cache/codeplan-browser}"
AXE_VERSION="4.14.1"
if [ "${1:-}" = "--apt" ]; then
    if ! command -v chromium >/dev/null || ! (fc-list 2>/dev/null | grep -i "wenquanyi\|wqy" >/dev/null); then
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium fonts-wqy-microhei >/dev/null
        echo "installed chromium and fonts-wqy-microhei"
    fi
fi
folder="$DIR/axe-core"
if [ -f "$folder/.installed" ] && [ "$(cat "$folder/.installed")" = "$AXE_VERSION" ]; then
    exit 0
fi
if ! command -v npm >/dev/null; then
    echo "npm not found: the accessibility checks need axe-core from npm" >&2
    exit 1
fi
rm -rf "$folder" && mkdir -p "$folder"
(cd "$folder" && npm init -y >/dev/null && npm install --no-audit --no-fund --loglevel=error "axe-core@$AXE_VERSION" >/dev/null)
echo "$AXE_VERSION" > "$folder/.installed"
echo "installed axe-core $AXE_VERSION into $folder"
