#!/usr/bin/env bash
# Sets up what Membrane needs and runs its demo (`membrane demo`). Extra arguments are passed
# to the demo, for example `--json`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/deps.sh
membrane_install_deps
cargo build --locked --quiet -p membrane-cli --bin membrane -p membrane-ztunnel --bin ztunnel
exec ./target/debug/membrane demo "$@"
