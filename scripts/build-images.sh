#!/usr/bin/env bash
# Builds the chart's two images as OCI archives, without a registry or a container daemon:
#   <out>/membrane-ca.oci.tar  ghcr.io/membrane-mesh/membrane-ca:<appVersion>
#   <out>/ztunnel.oci.tar      ghcr.io/membrane-mesh/ztunnel:<appVersion>
# Each rootfs is assembled here from the workspace's binaries and this machine's packages
# (images/*/Containerfile say what goes in) and kept as <out>/<image>/rootfs, the build context
# of its Containerfile; scripts/lib/oci_image.py packs it as one deterministic layer with the
# config, manifest and index. Then scripts/verify-images.sh checks both archives (root only).
#
#   scripts/build-images.sh [--bin-dir DIR] [--out DIR] [--no-verify]
#
# --bin-dir  where membrane-ca, ztunnel and membrane-cni are: default target/release, or
#            target/debug when target/release lacks one of them
# --out      default target/images
# --no-verify  only build (verification runs the binaries with chroot: it needs root)
#
# Load with `podman load -i target/images/ztunnel.oci.tar`, or push with
# `skopeo copy oci-archive:target/images/ztunnel.oci.tar docker://REGISTRY/ztunnel:TAG`.
set -euo pipefail
caller="$PWD"
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/deps.sh
source scripts/lib/deps.sh

# Paths given on the command line are relative to where the script was started.
absolute() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$caller/$1" ;;
    esac
}

binaries=(membrane-ca ztunnel membrane-cni)
bin_dir=""
out="$PWD/target/images"
verify=1
while (($#)); do
    case "$1" in
        --bin-dir)
            bin_dir="$(absolute "${2:?--bin-dir needs a directory}")"
            shift 2
            ;;
        --out)
            out="$(absolute "${2:?--out needs a directory}")"
            shift 2
            ;;
        --no-verify)
            verify=0
            shift
            ;;
        -h | --help)
            sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
            exit 0
            ;;
        *)
            echo "build-images: unknown argument $1 (see --help)" >&2
            exit 2
            ;;
    esac
done
if [ -z "$bin_dir" ]; then
    bin_dir="$PWD/target/release"
    for b in "${binaries[@]}"; do
        if [ ! -x "$bin_dir/$b" ]; then
            [ ! -d "$bin_dir" ] || echo "build-images: target/release has no $b: using target/debug" >&2
            bin_dir="$PWD/target/debug"
            break
        fi
    done
fi
for b in "${binaries[@]}"; do
    if [ ! -x "$bin_dir/$b" ]; then
        echo "build-images: $bin_dir/$b is missing: run \`cargo build --release --bins\` first," \
            "or name the directory with --bin-dir" >&2
        exit 1
    fi
done
membrane_install_image_deps

start=$SECONDS
version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/membrane/Chart.yaml)"
source_url="$(sed -n 's/^home: *//p' charts/membrane/Chart.yaml)"
registry="ghcr.io/membrane-mesh"
if [ -z "$version" ]; then
    echo "build-images: no appVersion in charts/membrane/Chart.yaml" >&2
    exit 1
fi
# The user the chart runs the controller and the gateways as (runAsUser / runAsGroup).
nonroot=65532
path_env="PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Applets linked into the ztunnel image: sh and every command charts/membrane/files/install-cni.sh
# runs that is not a shell builtin, plus a few for looking around with `kubectl exec`.
applets=(sh basename cat chmod cmp cp date dirname find ls mkdir mv rm sleep)

# Copies executable $1 to $2 inside rootfs $3 with every shared library ldd names and the
# dynamic loader, at the paths the binary looks them up by.
add_binary() {
    local src="$1" dest="$2" root="$3" libs lib
    install -D -m 0755 "$src" "$root$dest"
    libs="$(ldd "$src" 2>&1 || true)"
    if grep -q 'not found' <<<"$libs"; then
        echo "build-images: $src needs libraries this machine lacks:" >&2
        grep 'not found' <<<"$libs" >&2
        exit 1
    fi
    for lib in $(grep -oE '/[^ ]+' <<<"$libs" || true); do
        [ -e "$root$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
    done
}

# A fresh rootfs at $1: /etc/passwd and /etc/group with root and the chart's nonroot user, /tmp.
new_rootfs() {
    local root="$1"
    rm -rf "$root"
    mkdir -p "$root"/{etc,tmp,usr/local/bin}
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:%s:%s:nonroot:/home/nonroot:/sbin/nologin\n' \
        "$nonroot" "$nonroot" >"$root/etc/passwd"
    printf 'root:x:0:\nnonroot:x:%s:\n' "$nonroot" >"$root/etc/group"
}

# Packs rootfs $1 as image $2 (archive <out>/$2.oci.tar); the rest are oci_image.py options.
pack() {
    local root="$1" name="$2"
    shift 2
    python3 scripts/lib/oci_image.py build "$root" "$out/$name.oci.tar" \
        --ref "$registry/$name:$version" --env "$path_env" \
        --label "org.opencontainers.image.title=$name" \
        --label "org.opencontainers.image.version=$version" \
        --label "org.opencontainers.image.source=$source_url" "$@"
}

mkdir -p "$out"
echo "build-images: binaries from $bin_dir, images into $out" >&2

ca="$out/membrane-ca/rootfs"
new_rootfs "$ca"
add_binary "$bin_dir/membrane-ca" /usr/local/bin/membrane-ca "$ca"
pack "$ca" membrane-ca \
    --entrypoint '["/usr/local/bin/membrane-ca"]' --cmd '["serve","--source=kubernetes"]' \
    --user "$nonroot:$nonroot" \
    --label "org.opencontainers.image.description=Membrane controller: CA, node authorization, workload and policy stream"

zt="$out/ztunnel/rootfs"
new_rootfs "$zt"
add_binary "$bin_dir/ztunnel" /usr/local/bin/ztunnel "$zt"
add_binary "$bin_dir/membrane-cni" /usr/local/bin/membrane-cni "$zt"
add_binary "$(command -v nft)" /usr/sbin/nft "$zt"
add_binary "$(command -v jq)" /usr/bin/jq "$zt"
add_binary /bin/busybox /bin/busybox "$zt"
# The list is read whole first: `grep -q` exits at the first match, and under pipefail the
# SIGPIPE that busybox then gets would fail the check at random.
have_applets=$(/bin/busybox --list)
for applet in "${applets[@]}"; do
    if ! grep -qx "$applet" <<<"$have_applets"; then
        echo "build-images: this machine's busybox has no $applet applet (install busybox-static)" >&2
        exit 1
    fi
    ln -s busybox "$zt/bin/$applet"
done
pack "$zt" ztunnel --entrypoint '["/usr/local/bin/ztunnel"]' \
    --label "org.opencontainers.image.description=Membrane node agent (ztunnel, membrane-cni, nft) and gateways"

echo "build-images: built in $((SECONDS - start)) s" >&2
if [ "$verify" = 1 ]; then
    scripts/verify-images.sh --out "$out"
fi
