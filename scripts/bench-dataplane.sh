#!/usr/bin/env bash
# Runs the data-plane benchmark (tests/benches/dataplane.rs): builds the release ztunnel,
# installs iperf3 if it is missing, then runs direct, mesh and plain-relay rounds (and Istio
# ztunnel rounds when ISTIO_ZTUNNEL_BIN points at an Istio ztunnel built by hand with its
# `testing` feature; the project never builds one) and prints a Markdown table and one JSON
# line. Needs root (network namespaces). Takes about 2 minutes per
# round (3 rounds by default); MEMBRANE_BENCH_* variables (see the bench's header) change
# modes, rounds and durations.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/deps.sh
membrane_install_deps
if ! command -v iperf3 >/dev/null 2>&1; then
    membrane_need_root_for iperf3
    echo "membrane: installing iperf3" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends iperf3 >/dev/null
fi
cargo build --release --locked -p membrane-ztunnel
echo "load before the run: $(uptime)" >&2
cargo bench --locked -p membrane-tests --bench dataplane
