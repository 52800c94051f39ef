#!/usr/bin/env bash
# Builds the chart's two images as OCI archives, without a registry or a container daemon:
#   <out>/membrane-ca.oci.tar  ghcr.io/membrane-mesh/membrane-ca:<appVersion>
#   <out>/ztunnel.oci.tar      ghcr.io/membrane-mesh/ztunnel:<appVersion>
# Each rootfs is assembled here (images/*/Containerfile says what goes in), packed as one
# deterministic layer by scripts/lib/oci_image.py, then verified: the archive is unpacked, every
# blob checked against its digest, the layer extracted, and every binary run inside it with
# chroot (`--version`, `jq --version`, `/bin/sh -c true`, membrane-cni's CNI error).
#
#   scripts/build-images.sh [--bin-dir DIR] [--out DIR] [--no-verify]
# DIR defaults to target/release (target/debug when release is absent); out to target/images.
# Load with `podman load -i target/images/ztunnel.oci.tar` or
# `skopeo copy oci-archive:target/images/ztunnel.oci.tar docker://REGISTRY/ztunnel:TAG`.
set -euo pipefail
cd "$(dirname "$0")/.."

bin_dir=""
out="target/images"
verify=1
while (($#)); do
    case "$1" in
        --bin-dir) bin_dir="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --no-verify) verify=0; shift ;;
        *) echo "build-images: unknown argument $1" >&2; exit 2 ;;
    esac
done
if [ -z "$bin_dir" ]; then
    bin_dir=target/release
    [ -x "$bin_dir/ztunnel" ] || bin_dir=target/debug
fi
for b in membrane-ca ztunnel membrane-cni; do
    [ -x "$bin_dir/$b" ] || {
        echo "build-images: $bin_dir/$b is missing: run cargo build --release --bins first" >&2
        exit 1
    }
done

# What goes into the ztunnel image besides Membrane's binaries.
missing=()
command -v nft >/dev/null 2>&1 || missing+=(nftables)
command -v jq >/dev/null 2>&1 || missing+=(jq)
[ -x /bin/busybox ] || missing+=(busybox-static)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if ((${#missing[@]})); then
    if [ "$(id -u)" -ne 0 ]; then
        echo "build-images: needs ${missing[*]} (install as root)" >&2
        exit 1
    fi
    echo "build-images: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/membrane/Chart.yaml)"
registry="ghcr.io/membrane-mesh"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Copies executable $1 to $2 inside rootfs $3 with every shared library ldd names (and the
# dynamic loader), at the same paths.
add_binary() {
    local src="$1" dest="$2" root="$3" lib
    install -D -m 0755 "$src" "$root$dest"
    for lib in $(ldd "$src" 2>/dev/null | grep -oE '/[^ ]+' || true); do
        [ -e "$root$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
    done
}

base_rootfs() {
    local root="$1"
    mkdir -p "$root"/{etc,tmp,usr/local/bin}
    chmod 1777 "$root/tmp"
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
}

ca_root="$work/membrane-ca/rootfs"
base_rootfs "$ca_root"
add_binary "$bin_dir/membrane-ca" /usr/local/bin/membrane-ca "$ca_root"

zt_root="$work/ztunnel/rootfs"
base_rootfs "$zt_root"
add_binary "$bin_dir/ztunnel" /usr/local/bin/ztunnel "$zt_root"
add_binary "$bin_dir/membrane-cni" /usr/local/bin/membrane-cni "$zt_root"
add_binary "$(command -v nft)" /usr/sbin/nft "$zt_root"
add_binary "$(command -v jq)" /usr/bin/jq "$zt_root"
add_binary /bin/busybox /bin/busybox "$zt_root"
for applet in sh basename cat chmod cmp cp date dirname find ls mkdir mv rm sleep; do
    ln -s busybox "$zt_root/bin/$applet"
done

python3 scripts/lib/oci_image.py build "$ca_root" "$out/membrane-ca.oci.tar" \
    --ref "$registry/membrane-ca:$version" \
    --entrypoint '["/usr/local/bin/membrane-ca"]' --cmd '["serve","--source=kubernetes"]' \
    --user 65532:65532
python3 scripts/lib/oci_image.py build "$zt_root" "$out/ztunnel.oci.tar" \
    --ref "$registry/ztunnel:$version" --entrypoint '["/usr/local/bin/ztunnel"]'

[ "$verify" = 1 ] || exit 0

# Runs `$2…` inside the unpacked rootfs $1; fails naming the command.
run_in() {
    local root="$1"
    shift
    if ! chroot "$root" "$@" >"$work/out" 2>&1; then
        echo "build-images: '$*' does not run inside the image:" >&2
        cat "$work/out" >&2
        exit 1
    fi
    head -1 "$work/out"
}
if [ "$(id -u)" -ne 0 ]; then
    echo "build-images: verifying the images runs their binaries with chroot: needs root" >&2
    exit 1
fi
for image in membrane-ca ztunnel; do
    dest="$work/verify-$image"
    mkdir -p "$dest"
    python3 scripts/lib/oci_image.py verify "$out/$image.oci.tar" "$dest"
done
ca="$work/verify-membrane-ca/rootfs"
run_in "$ca" /usr/local/bin/membrane-ca --version
zt="$work/verify-ztunnel/rootfs"
run_in "$zt" /usr/local/bin/ztunnel --version
run_in "$zt" /usr/sbin/nft --version
run_in "$zt" /usr/bin/jq --version
run_in "$zt" /bin/sh -c 'basename /a/b && cmp /bin/busybox /bin/busybox && true'
# membrane-cni has no --version: without CNI_COMMAND it answers a CNI error in JSON.
if chroot "$zt" /usr/local/bin/membrane-cni </dev/null >"$work/out" 2>&1 ||
    ! grep -q '"cniVersion"' "$work/out"; then
    echo "build-images: membrane-cni does not answer as a CNI plugin inside the image:" >&2
    cat "$work/out" >&2
    exit 1
fi
head -c 120 "$work/out"
echo
ls -l "$out"/*.oci.tar
echo "build-images: both images verified"
