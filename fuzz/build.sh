#!/usr/bin/env bash
# Builds every fuzz target (CI). Works on a stable toolchain: cargo-fuzz needs nightly-only
# rustc flags (-Zsanitizer=address ...), which RUSTC_BOOTSTRAP=1 unlocks.
#
#   fuzz/build.sh            # debug-assertion build (cargo fuzz build --dev)
#   fuzz/build.sh --release  # optimised build, as `cargo fuzz run` uses by default
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

profile=(--dev)
if [[ "${1:-}" == "--release" ]]; then
    profile=()
fi

RUSTC_BOOTSTRAP=1 cargo fuzz build "${profile[@]}"
