#!/usr/bin/env bash
# Install prelock from this checkout and run the daemon.
#
#   sudo ./scripts/install-and-run.sh             install, then run in the foreground
#   sudo ./scripts/install-and-run.sh --no-run    install only
#   sudo ./scripts/install-and-run.sh --systemd   install, enable and start prelock.service
#   sudo ./scripts/install-and-run.sh --systemd --no-run
#                                                 install and enable the unit for the next boot
#
# Environment: PRELOCK_VENV sets the venv directory (default /opt/prelock/venv).
# PRELOCK_PYTHON sets the interpreter that creates it (default /usr/bin/python3).
# An existing /etc/prelock/prelock.yaml is never overwritten.
set -euo pipefail

repo_root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/debian-packages.sh
source "$repo_root/scripts/debian-packages.sh"

BUILD_PACKAGES=(python3 python3-venv python3-dev gcc libffi-dev)
VENV_DIR=${PRELOCK_VENV:-/opt/prelock/venv}
PYTHON=${PRELOCK_PYTHON:-/usr/bin/python3}
CONFIG_PATH=/etc/prelock/prelock.yaml
STATE_DIR=/var/lib/prelock
BIN_LINK=/usr/local/bin/prelock
UNIT_PATH=/etc/systemd/system/prelock.service

# Exit statuses follow the prelock CLI: 2 for usage errors, 3 for missing privilege.
EXIT_FAILURE=1
EXIT_USAGE=2
EXIT_PRIVILEGE=3

log() {
    printf 'install-and-run.sh: %s\n' "$*" >&2
}

die() {
    local status=$1
    shift
    log "error: $*"
    exit "$status"
}

usage() {
    sed -n '2,12s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

install_missing_packages() {
    local missing
    mapfile -t missing < <(list_missing_packages "$@")
    if [[ ${#missing[@]} -eq 0 ]]; then
        return
    fi
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
}

install_package() {
    if ! { [[ -x $VENV_DIR/bin/python ]] && "$VENV_DIR/bin/python" -c 'import sys' 2>/dev/null; }; then
        log "creating venv $VENV_DIR with $PYTHON"
        rm -rf -- "$VENV_DIR"
        "$PYTHON" -m venv "$VENV_DIR"
    fi
    log "installing prelock from $repo_root into $VENV_DIR"
    PIP_ROOT_USER_ACTION=ignore "$VENV_DIR/bin/pip" install --quiet "$repo_root"
}

install_config() {
    if [[ -e $CONFIG_PATH ]]; then
        log "keeping existing $CONFIG_PATH"
        return
    fi
    [[ -f $repo_root/config/prelock.yaml ]] ||
        die "$EXIT_FAILURE" "$repo_root/config/prelock.yaml not found: is this a prelock checkout?"
    install -D -m 0644 "$repo_root/config/prelock.yaml" "$CONFIG_PATH"
    log "installed default config to $CONFIG_PATH"
}

link_command() {
    # Only a symlink, left by an earlier install, is replaced. Any other file belongs
    # to someone else.
    if [[ -e $BIN_LINK && ! -L $BIN_LINK ]]; then
        die "$EXIT_FAILURE" "$BIN_LINK exists and is not a symlink: move it away and run again"
    fi
    ln -sfn "$VENV_DIR/bin/prelock" "$BIN_LINK"
    log "linked $BIN_LINK -> $VENV_DIR/bin/prelock"
}

require_systemd() {
    # The unit needs systemd as the service manager, which containers and chroots
    # usually lack. Checked before anything is installed.
    [[ -d /run/systemd/system ]] ||
        die "$EXIT_FAILURE" "systemd is not running on this machine: run without --systemd"
}

install_unit() {
    local start=$1
    install -m 0644 "$repo_root/systemd/prelock.service" "$UNIT_PATH"
    systemctl daemon-reload
    systemctl enable prelock.service
    if [[ $start == yes ]]; then
        # restart, so an upgrade replaces a daemon that is already running.
        systemctl restart prelock.service
        log "prelock.service started; follow it with: journalctl -u prelock -f"
    else
        log "prelock.service enabled; it starts at the next boot"
    fi
}

main() {
    local run=yes systemd=no
    while [[ $# -gt 0 ]]; do
        case $1 in
            --no-run) run=no ;;
            --systemd) systemd=yes ;;
            -h | --help) usage; exit 0 ;;
            *) usage >&2; die "$EXIT_USAGE" "unknown option: $1" ;;
        esac
        shift
    done
    [[ $EUID -eq 0 ]] || die "$EXIT_PRIVILEGE" "must run as root: sudo $0 $*"
    [[ $systemd == no ]] || require_systemd

    install_missing_packages "${BUILD_PACKAGES[@]}"
    install_package
    install_config
    install -d -m 0755 "$STATE_DIR"
    link_command

    if [[ $systemd == yes ]]; then
        install_unit "$run"
    elif [[ $run == yes ]]; then
        log "running: $BIN_LINK run -c $CONFIG_PATH"
        exec "$BIN_LINK" run -c "$CONFIG_PATH"
    fi
}

main "$@"
