# Sourced by install-and-run.sh and test.sh: which Debian packages are not installed.

# Print each named package that dpkg does not list as installed, one per line.
list_missing_packages() {
    local package status
    for package in "$@"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null || true)
        if [[ $status != installed ]]; then
            printf '%s\n' "$package"
        fi
    done
}
