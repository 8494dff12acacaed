#!/usr/bin/env bash
# The test command: services up, formatting, lints, then every test (unit, integration against
# the real PostgreSQL and NATS, the service binaries as processes). Fails on the first failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

step "ensure PostgreSQL and NATS"
bash ops/ensure-services.sh

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test --workspace"
cargo test --workspace

step "NATS-facing tests against a current nats-server 2.1x (ops/second-nats.sh)"
bash ops/second-nats.sh
