#!/usr/bin/env bash
# The control-plane scale benchmark (tests/benches/control_plane.rs): one release controller,
# 10,000 workloads, 2,000 AuthorizationPolicies, 1,000 node streams, against a real
# kube-apiserver and against the manifest directory. Installs kube-apiserver, etcd and kubectl
# when missing (scripts/lib/kube.sh). Scale: MEMBRANE_BENCH_CP_{WORKLOADS,POLICIES,NODES,EDITS};
# MEMBRANE_BENCH_CP_SOURCES=kubernetes|directory picks one source.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/deps.sh
membrane_install_test_deps
cargo build --release --locked -p membrane-ca -p membrane-ztunnel --bins
# 1,000 streams are 1,000 TLS connections at both ends, all in this machine: raise the
# descriptor limit to its hard limit (each end needs one descriptor per stream).
ulimit -n "$(ulimit -Hn)"
cargo bench --locked -p membrane-tests --bench control_plane
