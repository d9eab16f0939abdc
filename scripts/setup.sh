#!/usr/bin/env bash
# Installs what datanet's services, build and tests need on Debian 12, as root.
#
# Idempotent: packages already installed are skipped (no apt-get at all when nothing
# is missing), the Rust toolchain is installed only when cargo is absent, and the
# Garage binary is built once with `cargo install --locked` and cached in
# ${DATANET_GARAGE_ROOT:-/var/cache/datanet/garage}. Two concurrent runs (or a build
# started by hand with the same --root) never build Garage twice: the second waits.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Services, CAE tools and their demo inputs, the FUSE build dependency, and the tools
# the tests and scripts call.
PACKAGES=(
    fuse3 libfuse3-dev pkg-config build-essential
    slurm-wlm munge
    samba smbclient
    calculix-ccx calculix-ccx-test gmsh gmsh-doc
    ca-certificates curl git rsync sqlite3 python3 attr acl pv
    openssl iproute2 procps psmisc lsof util-linux
)

GARAGE_VERSION=${DATANET_GARAGE_VERSION:-2.5.0}
CACHE_DIR=$(dirname "$DATANET_GARAGE_ROOT")
GARAGE_BUILD_LOG="$CACHE_DIR/garage-build.log"

install_packages() {
    local missing=() package
    for package in "${PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$package")
        fi
    done
    if ((${#missing[@]} == 0)); then
        info "all ${#PACKAGES[@]} Debian packages are installed"
        return 0
    fi

    info "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${missing[@]}"
}

# Puts cargo on PATH, installing the Rust toolchain with rustup when it is absent
# (Debian 12's own rustc is older than this workspace needs).
ensure_rust() {
    if ! command -v cargo >/dev/null && [[ -x $HOME/.cargo/bin/cargo ]]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    if command -v cargo >/dev/null; then
        return 0
    fi
    info "installing the Rust toolchain with rustup (cargo not found)"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    export PATH="$HOME/.cargo/bin:$PATH"
    command -v cargo >/dev/null || die "rustup finished but cargo is still not on PATH"
}

garage_works() {
    [[ -x $DATANET_GARAGE ]] && "$DATANET_GARAGE" --version >/dev/null 2>&1
}

# True while some process runs `cargo install garage ... --root $DATANET_GARAGE_ROOT`,
# for example a build started by hand before this script.
garage_build_running() {
    local proc cmdline
    for proc in /proc/[0-9]*; do
        cmdline=$(tr '\0' ' ' <"$proc/cmdline" 2>/dev/null) || continue
        if [[ $cmdline == *cargo*install*garage* && $cmdline == *"$DATANET_GARAGE_ROOT"* ]]; then
            return 0
        fi
    done
    return 1
}

ensure_garage() {
    if garage_works; then
        info "Garage binary cached: $DATANET_GARAGE ($("$DATANET_GARAGE" --version 2>/dev/null | head -n 1))"
        return 0
    fi

    mkdir -p "$CACHE_DIR"
    local lock_fd
    exec {lock_fd}>"$CACHE_DIR/garage-build.lock"
    if ! flock -n "$lock_fd"; then
        info "another setup.sh is building Garage; waiting for it (log: $GARAGE_BUILD_LOG)"
        flock "$lock_fd"
    fi

    local waited_s=0
    while garage_build_running; do
        if ((waited_s % 60 == 0)); then
            info "a Garage build is already running; waiting (${waited_s}s so far, log: $GARAGE_BUILD_LOG)"
        fi
        sleep 5
        waited_s=$((waited_s + 5))
    done

    if garage_works; then
        info "Garage binary ready: $DATANET_GARAGE"
    else
        info "building Garage $GARAGE_VERSION (about 15-25 minutes on 2 cores; log: $GARAGE_BUILD_LOG)"
        if ! cargo install garage --version "$GARAGE_VERSION" --locked --root "$DATANET_GARAGE_ROOT" \
            >>"$GARAGE_BUILD_LOG" 2>&1; then
            tail -n 20 "$GARAGE_BUILD_LOG" >&2
            die "building Garage failed; see $GARAGE_BUILD_LOG"
        fi
        garage_works || die "cargo install finished but $DATANET_GARAGE does not run"
    fi
    flock -u "$lock_fd"
}

require_root
install_packages
ensure_rust
ensure_garage
info "setup complete"
