#!/usr/bin/env bash
# Install what the tests need (Debian packages, .venv), then run pytest.
#
#   sudo ./scripts/test.sh [PYTEST_ARGS...]
#
# Root is needed to install packages and for the tests marked `root`, which start
# sshd and containerd themselves. Nothing here starts a service: package installs
# run under a policy-rc.d that denies service starts. Safe to run again: installed
# packages and an existing .venv are reused.
set -euo pipefail

repo_root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/debian-packages.sh
source "$repo_root/scripts/debian-packages.sh"
cd "$repo_root"

# util-linux provides fincore(1), and systemd provides systemd-analyze(1).
TEST_PACKAGES=(openssh-server containerd util-linux vmtouch systemd gcc python3 python3-venv
               python3-dev libffi-dev)
VENV_DIR="$repo_root/.venv"
PYTHON=${PRELOCK_PYTHON:-/usr/bin/python3}
POLICY_RC=/usr/sbin/policy-rc.d

log() {
    printf 'test.sh: %s\n' "$*" >&2
}

die() {
    log "error: $*"
    exit 1
}

# Debian maintainer scripts start the services they install (sshd, containerd)
# through invoke-rc.d or deb-systemd-invoke. Both ask policy-rc.d first, and exit
# status 101 means "action forbidden". A policy-rc.d that already exists is kept.
deny_service_starts() {
    if [[ -e $POLICY_RC ]]; then
        log "keeping the existing $POLICY_RC during the install"
        return
    fi
    printf '#!/bin/sh\n# Written by prelock scripts/test.sh for one apt-get install.\nexit 101\n' \
        >"$POLICY_RC"
    chmod 0755 "$POLICY_RC"
    trap 'rm -f -- "$POLICY_RC"' EXIT
}

allow_service_starts() {
    trap - EXIT
    if grep -q 'Written by prelock scripts/test.sh' "$POLICY_RC" 2>/dev/null; then
        rm -f -- "$POLICY_RC"
    fi
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
    deny_service_starts
    apt-get install -y --no-install-recommends "${missing[@]}"
    allow_service_starts
}

ensure_venv() {
    if [[ -x $VENV_DIR/bin/python ]] && "$VENV_DIR/bin/python" -c 'import sys' 2>/dev/null; then
        return
    fi
    log "creating $VENV_DIR with $PYTHON"
    rm -rf -- "$VENV_DIR"
    "$PYTHON" -m venv "$VENV_DIR"
}

main() {
    if [[ $EUID -eq 0 ]]; then
        install_missing_packages "${TEST_PACKAGES[@]}"
    else
        local missing
        mapfile -t missing < <(list_missing_packages "${TEST_PACKAGES[@]}")
        if [[ ${#missing[@]} -gt 0 ]]; then
            die "missing Debian packages: ${missing[*]}. Run as root (sudo $0) to install them"
        fi
        log "not running as root: tests marked 'root' will be skipped"
    fi

    ensure_venv
    log "installing prelock into $VENV_DIR (pip install -e '.[test]')"
    PIP_ROOT_USER_ACTION=ignore "$VENV_DIR/bin/pip" install --quiet -e '.[test]'

    exec "$VENV_DIR/bin/pytest" -ra "$@"
}

main "$@"
