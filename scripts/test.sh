#!/usr/bin/env bash
# The project's test command, which .ci/run calls. Run it as root on Debian 12.
# It installs what is missing, builds, starts the service stack with two Slurm
# clusters and runs every test of the workspace against it. It stops the stack again
# in every case, and exits non-zero if any step or test fails.
#
# With arguments, it runs `cargo test ARGS` instead of every test, for example
#   scripts/test.sh -p datanet-e2e --test smoke
# DATANET_RUN_DIR and the port variables of scripts/stack.sh move the stack.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

require_root
check_run_dir
export PATH="$HOME/.cargo/bin:$PATH"
cd "$REPO_DIR"

started_at=$(date +%s)
step() {
    info "[$(($(date +%s) - started_at))s] $*"
}

step "installing what is missing"
bash "$SCRIPTS_DIR/setup.sh"

step "building the workspace and its tests"
cargo build --workspace --all-targets

stack_down() {
    local rc=$?
    step "stopping the stack"
    bash "$SCRIPTS_DIR/stack.sh" down || rc=1
    if ((rc == 0)); then
        step "all tests passed"
    else
        step "FAILED (exit $rc); service logs are in $RUN/logs"
    fi
    exit "$rc"
}
trap stack_down EXIT

step "starting the stack in $RUN"
bash "$SCRIPTS_DIR/stack.sh" up --two-clusters
# shellcheck source=/dev/null
source "$RUN/env.sh"

step "running every test"
if (($# > 0)); then
    cargo test "$@"
else
    cargo test --workspace --no-fail-fast
fi
