#!/usr/bin/env bash
# Installs the real coding-tool CLIs into a cache outside the repository, once per machine.
# Usage: tests/clients/install.sh [DIR]   (default: $CODEPLAN_CLIENTS_DIR or ~/.cache/codeplan-clients)
set -euo pipefail
DIR="${1:-${CODEPLAN_CLIENTS_DIR:-$HOME/.cache/codeplan-clients}}"
mkdir -p "$DIR"
install() {  # name package
    local name=$1 package=$2 folder="$DIR/$1"
    if [ -f "$folder/.installed" ] && [ "$(cat "$folder/.installed")" = "$package" ]; then
        return 0
    fi
    rm -rf "$folder" && mkdir -p "$folder"
    (cd "$folder" && npm init -y >/dev/null && npm install --no-audit --no-fund --loglevel=error "$package" >/dev/null)
    echo "$package" > "$folder/.installed"
    echo "installed $package into $folder"
}
if ! command -v npm >/dev/null; then
    echo "npm not found: the real-client tests need Node.js and npm" >&2
    exit 1
fi
install claude @anthropic-ai/claude-code &
install opencode opencode-ai &
install kilo @kilocode/cli@7.7.7 &
install cline cline &
install codex @openai/codex@0.171.0 &
wait
for name in claude opencode kilo cline codex; do
    test -f "$DIR/$name/.installed" || { echo "failed to install $name" >&2; exit 1; }
done
