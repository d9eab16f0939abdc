#!/usr/bin/env bash
# The main job, as root on Debian 12: install what is missing, build, start the service
# stack, and run the CAE flow across the data network (scripts/demo/flow.sh), one line
# per step with timing and a summary at the end.
#
#   scripts/demo.sh [--keep] [--mountpoint PATH]
#
# --keep leaves the flow's mount, buckets and files and the stack running afterwards;
# otherwise the flow removes what it made, and the stack is stopped again if this run
# started it. --mountpoint mounts datanet at PATH instead of /datanet (which must be
# free: absent or an empty directory). DATANET_RUN_DIR and the port variables of
# scripts/stack.sh move the stack.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KEEP=0
MOUNTPOINT=/datanet
while (($# > 0)); do
    case $1 in
        --keep) KEEP=1 ;;
        --mountpoint) (($# >= 2)) || die "--mountpoint needs a PATH"; MOUNTPOINT=$2; shift ;;
        --mountpoint=*) MOUNTPOINT=${1#*=} ;;
        *) die "unknown argument \"$1\"; usage: $0 [--keep] [--mountpoint PATH]" ;;
    esac
    shift
done

require_root
check_run_dir
export PATH="$HOME/.cargo/bin:$PATH"
cd "$REPO_DIR"

STEP_LOG=$(mktemp /tmp/datanet-demo.XXXXXX.log)
SUMMARY=()

# Runs one step: prints "name ... ok (Ns)" or the step's output and fails.
step() {
    local name=$1 started_ms rc=0
    shift
    started_ms=$(($(date +%s%N) / 1000000))
    printf '%-52s ' "$name" >&2
    "$@" >>"$STEP_LOG" 2>&1 || rc=$?
    local elapsed_ms elapsed
    elapsed_ms=$(($(date +%s%N) / 1000000 - started_ms))
    elapsed=$(printf '%d.%d' $((elapsed_ms / 1000)) $((elapsed_ms % 1000 / 100)))
    if ((rc == 0)); then
        printf 'ok   (%ss)\n' "$elapsed" >&2
        SUMMARY+=("$name|ok|${elapsed}s")
    else
        printf 'FAIL (%ss)\n' "$elapsed" >&2
        SUMMARY+=("$name|FAIL|${elapsed}s")
        echo "--- last lines of $STEP_LOG ---" >&2
        tail -n 25 "$STEP_LOG" >&2
        exit "$rc"
    fi
}

print_summary() {
    local row name result elapsed
    printf '\n%-52s %-6s %s\n' "step" "result" "time" >&2
    for row in "${SUMMARY[@]}"; do
        IFS='|' read -r name result elapsed <<<"$row"
        printf '%-52s %-6s %s\n' "$name" "$result" "$elapsed" >&2
    done
    printf '\nfull log: %s\n' "$STEP_LOG" >&2
}

# ---------------------------------------------------------------------------
# The flow: its steps print their own lines; its command output goes to $STEP_LOG.

source "$SCRIPTS_DIR/demo/preflight.sh"

run_flow() {
    local args=(--mountpoint "$MOUNTPOINT" --log "$STEP_LOG") rc=0 started_ms elapsed_ms result
    ((KEEP == 0)) || args+=(--keep)
    started_ms=$(($(date +%s%N) / 1000000))
    echo >&2
    bash "$SCRIPTS_DIR/demo/flow.sh" "${args[@]}" || rc=$?
    elapsed_ms=$(($(date +%s%N) / 1000000 - started_ms))
    result=ok
    ((rc == 0)) || result=FAIL
    SUMMARY+=("run the CAE flow (scripts/demo/flow.sh)|$result|$((elapsed_ms / 1000)).$((elapsed_ms % 1000 / 100))s")
    return "$rc"
}

# ---------------------------------------------------------------------------

stack_was_up=0
finish() {
    local rc=$?
    if ((KEEP == 0 && stack_was_up == 0)); then
        bash "$SCRIPTS_DIR/stack.sh" down >>"$STEP_LOG" 2>&1 || rc=1
        SUMMARY+=("stop the stack|done|-")
    fi
    print_summary
    if ((rc == 0)); then
        echo "demo finished" >&2
    else
        echo "demo FAILED (exit $rc)" >&2
    fi
    exit "$rc"
}

# A taken mountpoint is reported before the long set-up, not after it.
check_mountpoint_free

if bash "$SCRIPTS_DIR/stack.sh" status >/dev/null 2>&1; then
    stack_was_up=1
fi
trap finish EXIT

step "install what is missing" bash "$SCRIPTS_DIR/setup.sh"
step "build the workspace" cargo build --workspace
step "start the stack in $RUN" bash "$SCRIPTS_DIR/stack.sh" up
# shellcheck source=/dev/null
source "$RUN/env.sh"
run_flow
