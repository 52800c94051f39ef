#!/bin/sh
# Installs Membrane's CNI plugin on this node, keeps it installed, and removes it when the pod
# stops. Runs in the `install-cni` container of the ztunnel DaemonSet (ztunnel image: POSIX
# sh, jq, cmp). Every step is idempotent.
#
#   install-cni.sh run        install, re-check every $MEMBRANE_CNI_INTERVAL s, uninstall on TERM/INT
#   install-cni.sh install    copy the binary, chain the entry into the first configuration list
#   install-cni.sh uninstall  remove the entry from every configuration list, then the binary
#   install-cni.sh check      exit 0 when both are in place (readiness)
#
# Environment (paths as mounted in the container):
#   CNI_BIN_DIR          host CNI bin directory                    (default /host/opt/cni/bin)
#   CNI_CONF_DIR         host CNI configuration directory          (default /host/etc/cni/net.d)
#   MEMBRANE_CNI_SOURCE  plugin binary in the image                (default /usr/local/bin/membrane-cni)
#   MEMBRANE_CNI_ENTRY   the chained plugin entry, JSON; its "type" names the plugin (required)
#   MEMBRANE_CNI_INTERVAL seconds between checks in `run`          (default 10)
set -eu
export LC_ALL=C

CNI_BIN_DIR="${CNI_BIN_DIR:-/host/opt/cni/bin}"
CNI_CONF_DIR="${CNI_CONF_DIR:-/host/etc/cni/net.d}"
MEMBRANE_CNI_SOURCE="${MEMBRANE_CNI_SOURCE:-/usr/local/bin/membrane-cni}"
MEMBRANE_CNI_INTERVAL="${MEMBRANE_CNI_INTERVAL:-10}"
: "${MEMBRANE_CNI_ENTRY:?MEMBRANE_CNI_ENTRY (the plugin entry, JSON) is required}"

log() {
    printf '%s install-cni: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2
}

plugin_type() {
    printf '%s' "$MEMBRANE_CNI_ENTRY" | jq -er '.type | select(type == "string" and length > 0)'
}

# The configuration the container runtime uses: the first file, by byte order of its name,
# with a CNI extension (libcni's rule).
first_conf() {
    for f in "$CNI_CONF_DIR"/*; do
        case "$f" in
            *.conflist | *.conf | *.json)
                if [ -f "$f" ]; then
                    printf '%s\n' "$f"
                    return 0
                fi
                ;;
        esac
    done
    return 1
}

# Replaces $1 with the text $2 atomically, keeping the file's mode and owner. (Functions
# check every step themselves: `set -e` does not apply inside `install || true`.)
replace_file() {
    tmp="$(dirname "$1")/.$(basename "$1").membrane-tmp"
    if cp -p "$1" "$tmp" && printf '%s\n' "$2" >"$tmp" && mv -f "$tmp" "$1"; then
        return 0
    fi
    rm -f "$tmp"
    log "cannot rewrite $1"
    return 1
}

install_binary() {
    name="$(plugin_type)" || return 1
    dst="$CNI_BIN_DIR/$name"
    if [ -f "$dst" ] && cmp -s "$MEMBRANE_CNI_SOURCE" "$dst"; then
        return 0
    fi
    # Copy beside the target, then rename: a runtime never executes a half-written binary.
    tmp="$CNI_BIN_DIR/.$name.membrane-tmp"
    if cp "$MEMBRANE_CNI_SOURCE" "$tmp" && chmod 0755 "$tmp" && mv -f "$tmp" "$dst"; then
        log "installed $dst"
        return 0
    fi
    rm -f "$tmp"
    log "cannot install $dst"
    return 1
}

install_entry() {
    if ! conf="$(first_conf)"; then
        log "no CNI configuration in $CNI_CONF_DIR yet (the primary CNI has not written it); will retry"
        return 1
    fi
    case "$conf" in
        *.conflist) ;;
        *)
            log "$conf is a single-plugin configuration; membrane-cni chains only into a .conflist"
            return 1
            ;;
    esac
    # Drop any previous membrane entry, append the current one: the plugin runs last, after
    # the primary CNI has set the pod's network up.
    if ! new="$(jq --argjson e "$MEMBRANE_CNI_ENTRY" \
        'if (.plugins | type) == "array"
         then .plugins = ([.plugins[] | select(.type != $e.type)] + [$e])
         else error("no plugins list") end' "$conf")"; then
        log "cannot read $conf as a CNI configuration list; leaving it alone"
        return 1
    fi
    if [ "$(printf '%s' "$new" | jq -cS .)" = "$(jq -cS . "$conf")" ]; then
        return 0
    fi
    replace_file "$conf" "$new" || return 1
    log "chained $(printf '%s' "$MEMBRANE_CNI_ENTRY" | jq -c .) into $conf"
}

# The binary first: the entry must never name a plugin the runtime cannot find.
install() {
    install_binary && install_entry
}

# The entries first, then the binary; carries on past a failure and reports it at the end.
uninstall() {
    name="$(plugin_type)" || return 1
    status=0
    for f in "$CNI_CONF_DIR"/*.conflist; do
        [ -f "$f" ] || continue
        if jq -e --arg t "$name" 'any(.plugins[]?; .type == $t)' "$f" >/dev/null 2>&1; then
            if new="$(jq --arg t "$name" '.plugins = [.plugins[] | select(.type != $t)]' "$f")" &&
                replace_file "$f" "$new"; then
                log "removed $name from $f"
            else
                status=1
            fi
        fi
    done
    if [ -e "$CNI_BIN_DIR/$name" ]; then
        if rm -f "$CNI_BIN_DIR/$name"; then
            log "removed $CNI_BIN_DIR/$name"
        else
            status=1
        fi
    fi
    return "$status"
}

check() {
    name="$(plugin_type)" || return 1
    cmp -s "$MEMBRANE_CNI_SOURCE" "$CNI_BIN_DIR/$name" || return 1
    conf="$(first_conf)" || return 1
    jq -e --argjson e "$MEMBRANE_CNI_ENTRY" '.plugins[-1] == $e' "$conf" >/dev/null 2>&1
}

run() {
    sleeper=""
    trap 'stop' TERM INT
    log "installing into $CNI_BIN_DIR and $CNI_CONF_DIR"
    while :; do
        install || true
        sleep "$MEMBRANE_CNI_INTERVAL" &
        sleeper=$!
        wait "$sleeper" || true
        sleeper=""
    done
}

stop() {
    if [ -n "$sleeper" ]; then
        kill "$sleeper" 2>/dev/null || true
    fi
    log "stopping: removing the plugin from this node"
    if uninstall; then
        exit 0
    fi
    exit 1
}

case "${1:-}" in
    run) run ;;
    install) install ;;
    uninstall) uninstall ;;
    check) check ;;
    *)
        echo "usage: $0 run|install|uninstall|check" >&2
        exit 2
        ;;
esac
