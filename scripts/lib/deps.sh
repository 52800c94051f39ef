# shellcheck shell=bash
# Installs what Membrane's scripts need on a fresh Debian/Ubuntu machine, and checks the rest.
# Sourced by scripts/demo.sh, scripts/test.sh and .ci/run; safe to run repeatedly.

membrane_need_root_for() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "membrane: installing $* needs root; re-run as root (sudo $0)" >&2
        exit 1
    fi
}

membrane_install_deps() {
    local missing=()
    command -v ip >/dev/null 2>&1 || missing+=(iproute2)
    command -v iptables >/dev/null 2>&1 || missing+=(iptables)
    command -v nft >/dev/null 2>&1 || missing+=(nftables)
    command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    # dig: querying from a pod of the demo / local mesh through the DNS capture.
    command -v dig >/dev/null 2>&1 || missing+=(dnsutils)
    [ -e /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
    if ((${#missing[@]})); then
        membrane_need_root_for "${missing[*]}"
        echo "membrane: installing system packages: ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        if [ -x "$HOME/.cargo/bin/cargo" ]; then
            export PATH="$HOME/.cargo/bin:$PATH"
        else
            echo "membrane: a Rust toolchain (1.89 or newer, with cargo) is required: https://rustup.rs" >&2
            exit 1
        fi
    fi
}

# What scripts/build-images.sh puts into the ztunnel image besides Membrane's binaries (nft,
# jq, a static busybox for /bin/sh), what it builds and checks them with (python3, ldd), and
# scripts/verify-images.sh's tools (unshare, chroot and jq on this machine).
membrane_install_image_deps() {
    local missing=()
    command -v nft >/dev/null 2>&1 || missing+=(nftables)
    command -v jq >/dev/null 2>&1 || missing+=(jq)
    [ -x /bin/busybox ] || missing+=(busybox-static)
    command -v python3 >/dev/null 2>&1 || missing+=(python3)
    command -v ldd >/dev/null 2>&1 || missing+=(libc-bin)
    command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
    if ((${#missing[@]})); then
        membrane_need_root_for "${missing[*]}"
        echo "membrane: installing system packages: ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# The test suite also needs helm (chart lint/template tests), jq (the chart's CNI script) and a
# Kubernetes control plane (kube-apiserver, etcd, kubectl) for the real-API-server tests.
membrane_install_test_deps() {
    membrane_install_deps
    source "$(dirname "${BASH_SOURCE[0]}")/helm.sh"
    membrane_install_helm
    # kube-apiserver, etcd and kubectl: the tests against a real Kubernetes API server.
    source "$(dirname "${BASH_SOURCE[0]}")/kube.sh"
    membrane_install_kube
}
