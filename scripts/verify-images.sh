#!/usr/bin/env bash
# Verifies the image archives scripts/build-images.sh writes, the way the chart uses them:
# 1. each archive is unpacked and checked by scripts/lib/oci_image.py (layout, the name the
#    chart pulls, every blob against its digest and size, diff_ids, amd64/linux, an entrypoint
#    that exists) and its layer extracted; where skopeo is installed it reads the archive too;
# 2. every binary runs inside its unpacked image with chroot — the image's root file system
#    read-only (as readOnlyRootFilesystem mounts it), its Env only, as the user the chart runs
#    that container as, in a fresh network namespace: `membrane-ca --version` and
#    `ztunnel --version` through the image's entrypoint, `nft` applying a table and listing it
#    as JSON (as the ztunnel does in each pod), `jq`, `/bin/sh`, and `membrane-cni` answering
#    a CNI error;
# 3. the chart's CNI install step (charts/membrane/files/install-cni.sh) runs in the ztunnel
#    image with the DaemonSet's environment against a fake node's CNI directories: `run`
#    installs the plugin and chains the entry, the readiness `check` passes, and TERM removes
#    both.
# Any failure names the check, the command and its output. Needs root (chroot, mount and
# network namespaces); every mount lives in a private mount namespace and the scratch
# directory is removed on any exit.
#
#   scripts/verify-images.sh [--out DIR]     (the archives' directory, default target/images)
set -euo pipefail
caller="$PWD"
cd "$(dirname "$0")/.."

out="$PWD/target/images"
while (($#)); do
    case "$1" in
        --out)
            case "${2:?--out needs a directory}" in
                /*) out="$2" ;;
                *) out="$caller/$2" ;;
            esac
            shift 2
            ;;
        *)
            echo "verify-images: unknown argument $1" >&2
            exit 2
            ;;
    esac
done

fail() {
    echo "verify-images: FAILED: $*" >&2
    exit 1
}

if [ "$(id -u)" -ne 0 ]; then
    fail "needs root (chroot, mount and network namespaces): run as root, or build with --no-verify"
fi
version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/membrane/Chart.yaml)"
registry="ghcr.io/membrane-mesh"
nonroot=65532:65532
for image in membrane-ca ztunnel; do
    [ -f "$out/$image.oci.tar" ] || fail "no $out/$image.oci.tar: run scripts/build-images.sh first"
done
for tool in python3 jq unshare chroot; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool is missing here (scripts/build-images.sh installs it)"
done

# From here on in a private mount namespace: the mounts vanish with this process.
if [ "${MEMBRANE_VERIFY_IMAGES_NS:-}" != 1 ]; then
    exec env MEMBRANE_VERIFY_IMAGES_NS=1 unshare --mount --propagation private -- \
        bash scripts/verify-images.sh --out "$out"
fi

start=$SECONDS
work="$(mktemp -d)"
cni_pid=""
cleanup() {
    if [ -n "$cni_pid" ]; then
        kill "$cni_pid" 2>/dev/null || true
    fi
    umount -R -l "$work" 2>/dev/null || true
    rmdir "$work" 2>/dev/null || rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mount -t tmpfs membrane-verify-images "$work"

# image_exec DEST USER [VAR=VALUE…] -- COMMAND…: execs COMMAND in the unpacked image DEST as
# uid:gid USER (root when empty) with the image's Env and the given variables only, in a fresh
# network namespace. It replaces the calling process: call it in a subshell.
image_exec() {
    local dest="$1" user="$2"
    shift 2
    local -a vars=() image_env=() as=()
    while [ "$1" != "--" ]; do
        vars+=("$1")
        shift
    done
    shift
    mapfile -t image_env <"$dest/image.env"
    [ -z "$user" ] || as=(--userspec="$user")
    exec env -i "${image_env[@]}" "${vars[@]}" unshare --net -- chroot "${as[@]}" "$dest/rootfs" "$@"
}

# check WANT WHAT PATTERN DEST USER [VAR=VALUE…] -- COMMAND…: runs COMMAND with image_exec
# (stdin from $stdin, /dev/null by default); WANT is `ok` (exit 0) or `error` (non-zero); the
# output must match the extended regex PATTERN unless it is empty.
stdin=/dev/null
check() {
    local want="$1" what="$2" pattern="$3" status=0 command
    shift 3
    command="$*"
    command="${command#* -- }"
    (image_exec "$@") <"$stdin" >"$work/out" 2>&1 || status=$?
    if { [ "$want" = ok ] && [ "$status" -ne 0 ]; } || { [ "$want" = error ] && [ "$status" -eq 0 ]; } ||
        { [ -n "$pattern" ] && ! grep -qE -- "$pattern" "$work/out"; }; then
        echo "verify-images: FAILED: $what: \`$command\` exited $status (expected $want${pattern:+, output matching /$pattern/}):" >&2
        sed -n '1,20s/^/    /p' "$work/out" >&2
        exit 1
    fi
    printf '  ok  %-62s %s\n' "$what" "$(head -1 "$work/out" | cut -c1-70)"
}

# Unpacks and checks archive $1 into $work/$1; mounts its rootfs read-only after creating the
# mount points named in the rest of the arguments (the pod's volumes).
unpack() {
    local image="$1" dest="$work/$1" digest
    shift
    mkdir "$dest"
    python3 scripts/lib/oci_image.py verify "$out/$image.oci.tar" "$dest" \
        --ref "$registry/$image:$version" || fail "$out/$image.oci.tar is not a valid image archive"
    if command -v skopeo >/dev/null 2>&1; then
        digest="$(skopeo inspect --format '{{.Digest}}' "oci-archive:$out/$image.oci.tar")" ||
            fail "skopeo cannot read $out/$image.oci.tar"
        [ "$digest" = "$(jq -r '.manifests[0].digest' "$dest/index.json")" ] ||
            fail "skopeo reads manifest $digest from $out/$image.oci.tar, index.json names another"
        echo "  ok  skopeo reads $image.oci.tar: manifest $digest"
    else
        echo "  --  skopeo is not installed: the archive was read by oci_image.py only"
    fi
    for dir in /dev /proc /sys "$@"; do
        mkdir -p "$dest/rootfs$dir"
    done
    mount --bind "$dest/rootfs" "$dest/rootfs"
    mount -o remount,bind,ro "$dest/rootfs"
    runtime_mounts "$dest/rootfs"
}

# What a container runtime mounts into every container whatever its image: /dev with the
# standard devices (the scripts redirect to /dev/null), /proc, and /sys read-only.
runtime_mounts() {
    local root="$1" dev
    mount -t tmpfs -o mode=0755,nosuid membrane-dev "$root/dev"
    for dev in null zero full random urandom tty; do
        touch "$root/dev/$dev"
        mount --bind "/dev/$dev" "$root/dev/$dev"
    done
    ln -s /proc/self/fd "$root/dev/fd"
    ln -s /proc/self/fd/0 "$root/dev/stdin"
    ln -s /proc/self/fd/1 "$root/dev/stdout"
    ln -s /proc/self/fd/2 "$root/dev/stderr"
    mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
    mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
}

echo "verify-images: $out"
unpack membrane-ca
ca="$work/membrane-ca"
mapfile -d '' ca_entry <"$ca/image.entrypoint"
[ "$(cat "$ca/image.user")" = "$nonroot" ] ||
    fail "membrane-ca image: user is '$(cat "$ca/image.user")', the chart runs the controller as $nonroot"
check ok "membrane-ca: entrypoint --version as $nonroot" '^membrane-ca ' \
    "$ca" "$nonroot" -- "${ca_entry[@]}" --version
check ok "membrane-ca: serve --help (the chart's command)" '^Usage: membrane-ca serve' \
    "$ca" "$nonroot" -- "${ca_entry[@]}" serve --help

unpack ztunnel /etc/membrane/cni /host/cni/bin /host/cni/net.d
zt="$work/ztunnel"
mapfile -d '' zt_entry <"$zt/image.entrypoint"
check ok "ztunnel: entrypoint --version as root (DaemonSet)" '^ztunnel ' \
    "$zt" "" -- "${zt_entry[@]}" --version
check ok "ztunnel: entrypoint --version as $nonroot (gateways)" '^ztunnel ' \
    "$zt" "$nonroot" -- "${zt_entry[@]}" --version
check ok "ztunnel image: nft --version" '^nftables v' "$zt" "" -- nft --version
# What the ztunnel asks of nft in each pod: a table applied from stdin (`nft -f -`) with a
# named counter, a timed flow set and nat redirects, then read back as JSON (`nft -j list`).
cat >"$work/rules.nft" <<'EOF'
table inet membrane_verify {
  counter udp_egress { }
  set udp_flows4 { type ipv4_addr . inet_service; flags dynamic,timeout; timeout 600s; size 1024; }
  chain output {
    type nat hook output priority -100; policy accept;
    oifname "lo" accept
    udp dport 53 redirect to :15053
    meta l4proto tcp redirect to :15001
  }
  chain egress {
    type filter hook output priority 0; policy accept;
    fib daddr type local accept
    meta l4proto udp counter name "udp_egress"
    meta nfproto ipv4 meta l4proto udp ct state new update @udp_flows4 { ip daddr . udp dport }
  }
}
EOF
stdin="$work/rules.nft"
check ok "ztunnel image: nft -f - then nft -j list (a pod's table)" '"udp_egress"' \
    "$zt" "" -- /bin/sh -c 'nft -f - && nft -j list table inet membrane_verify'
stdin=/dev/null
check ok "ztunnel image: jq --version" '^jq-' "$zt" "" -- jq --version
check ok "ztunnel image: /bin/sh -c true" '' "$zt" "" -- /bin/sh -c true
# membrane-cni has no --version: without CNI_COMMAND it answers a CNI error in JSON.
check error "ztunnel image: membrane-cni answers as a CNI plugin" '"cniVersion"' \
    "$zt" "" -- /usr/local/bin/membrane-cni

# The install-cni container: the ConfigMap's script at /etc/membrane/cni (read-only), the
# node's CNI directories at /host/cni/{bin,net.d}, the DaemonSet's environment (the entry as
# the chart renders it with the default values).
node="$work/node"
mkdir -p "$node/cni" "$node/bin" "$node/net.d"
install -m 0555 charts/membrane/files/install-cni.sh "$node/cni/install-cni.sh"
conf="$node/net.d/10-primary.conflist"
printf '%s\n' '{"cniVersion":"1.0.0","name":"primary","plugins":[{"type":"ptp"}]}' >"$conf"
mount --bind "$node/cni" "$zt/rootfs/etc/membrane/cni"
mount -o remount,bind,ro "$zt/rootfs/etc/membrane/cni"
mount --bind "$node/bin" "$zt/rootfs/host/cni/bin"
mount --bind "$node/net.d" "$zt/rootfs/host/cni/net.d"
cni_env=(
    CNI_BIN_DIR=/host/cni/bin CNI_CONF_DIR=/host/cni/net.d
    MEMBRANE_CNI_SOURCE=/usr/local/bin/membrane-cni
    'MEMBRANE_CNI_ENTRY={"enrollSocket":"/var/run/membrane/ztunnel.sock","failClosed":true,"type":"membrane-cni"}'
    MEMBRANE_CNI_INTERVAL=1
)
cni_fail() {
    echo "verify-images: FAILED: the CNI install step in the ztunnel image: $*" >&2
    echo "  install-cni.sh run said:" >&2
    sed -n '1,30s/^/    /p' "$work/cni.log" >&2
    exit 1
}
(image_exec "$zt" "" "${cni_env[@]}" -- /bin/sh /etc/membrane/cni/install-cni.sh run) \
    </dev/null >"$work/cni.log" 2>&1 &
cni_pid=$!
ready=""
for _ in $(seq 40); do
    if (image_exec "$zt" "" "${cni_env[@]}" -- /bin/sh /etc/membrane/cni/install-cni.sh check) \
        </dev/null >/dev/null 2>&1; then
        ready=1
        break
    fi
    kill -0 "$cni_pid" 2>/dev/null || cni_fail "\`install-cni.sh run\` exited"
    sleep 0.25
done
[ -n "$ready" ] || cni_fail "the readiness check (\`install-cni.sh check\`) did not pass within 10 s"
cmp -s "$node/bin/membrane-cni" "$zt/rootfs/usr/local/bin/membrane-cni" ||
    cni_fail "the node's CNI bin directory has no copy of membrane-cni"
jq -e '[.plugins[].type] == ["ptp", "membrane-cni"]' "$conf" >/dev/null ||
    cni_fail "the entry is not chained last into $(basename "$conf"): $(jq -c . "$conf")"
echo "  ok  install-cni.sh run: plugin installed, entry chained, readiness check passes"
kill -TERM "$cni_pid"
status=0
wait "$cni_pid" || status=$?
cni_pid=""
[ "$status" -eq 0 ] || cni_fail "\`install-cni.sh run\` exited $status on TERM"
[ ! -e "$node/bin/membrane-cni" ] || cni_fail "TERM left membrane-cni in the node's bin directory"
jq -e '[.plugins[].type] == ["ptp"]' "$conf" >/dev/null ||
    cni_fail "TERM left the entry in $(basename "$conf"): $(jq -c . "$conf")"
echo "  ok  install-cni.sh on TERM: plugin and entry removed"

ls -l "$out"/*.oci.tar
echo "verify-images: both images verified in $((SECONDS - start)) s"
