#!/usr/bin/env bash
# Installs what the test suite needs and runs all of it: unit, integration and end-to-end
# tests of every crate, then the doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/deps.sh
membrane_install_test_deps
# The end-to-end tests run the binaries (ztunnel, membrane-cni, membrane-ca, membrane) as
# separate processes: build them all first (Cargo only builds a package's binaries for its own
# integration tests).
cargo build --workspace --bins --locked
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast
else
    cargo test --workspace --locked --no-fail-fast --lib --bins --tests
fi
cargo test --workspace --locked --doc --quiet
# Resource test (ignored by default): a 10,000-connection flood against one ztunnel's
# listeners; its memory and descriptors must come back within 30 s.
cargo test -p membrane-tests --locked --test hardening_listeners -- --ignored --test-threads=1
