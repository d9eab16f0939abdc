#!/usr/bin/env bash
# The main job, as root on Debian 12: install what is missing, build, start the service
# stack, and run the CAE flow across the data network, one line per step with timing
# and a summary at the end.
#
#   scripts/demo.sh [--keep]
#
# --keep leaves the stack running afterwards; otherwise the stack is stopped again if
# this run started it. DATANET_RUN_DIR and the port variables of scripts/stack.sh
# move the stack.
#
# NOTE: run_flow is a smoke run of the flow (one CalculiX deck through Garage, Slurm and
# Samba, driven with curl, sbatch and smbclient). The full flow through the datanet
# mount, jobwrap and samba-provisioner replaces run_flow.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KEEP=0
for arg in "$@"; do
    case $arg in
        --keep) KEEP=1 ;;
        *) die "unknown argument \"$arg\"; usage: $0 [--keep]" ;;
    esac
done

require_root
check_run_dir
export PATH="$HOME/.cargo/bin:$PATH"
cd "$REPO_DIR"

CCX_TESTS=/usr/share/doc/calculix-ccx-test/examples/test
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
# S3 access with curl's SigV4 signing; the key pair is passed on stdin, never in
# the argument list.

s3_curl() {
    local secret
    secret=$(<"$DATANET_S3_SECRET_FILE")
    printf 'user = "%s:%s"\n' "$DATANET_S3_ACCESS_KEY_ID" "$secret" |
        curl -sS --fail-with-body -K - --aws-sigv4 "aws:amz:$DATANET_S3_REGION:s3" \
            -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' "$@"
}

s3_put() {
    s3_curl -T "$1" "$DATANET_S3_ENDPOINT/$2"
}

s3_get() {
    s3_curl -o "$2" "$DATANET_S3_ENDPOINT/$1"
}

# ---------------------------------------------------------------------------
# The flow.

DECK=achtel2
WORK=

upload_model() {
    local local_dir="$WORK/upload"
    mkdir -p "$local_dir"
    cp "$CCX_TESTS/$DECK.inp" "$local_dir/"
    s3_put "$local_dir/$DECK.inp" "datanet-models/demo/$DECK.inp"
}

solve() {
    local job_dir="$DATANET_SCRATCH_ROOT/demo-$$"
    mkdir -p "$job_dir"
    s3_get "datanet-models/demo/$DECK.inp" "$job_dir/$DECK.inp"
    SLURM_CONF=$DATANET_SLURM_CONF sbatch --wait --job-name=datanet-demo \
        --chdir="$job_dir" --output="$job_dir/slurm-%j.out" \
        --wrap="ccx -i $DECK"
    local output
    for output in "$DECK.dat" "$DECK.frd"; do
        s3_put "$job_dir/$output" "datanet-results/demo/$output"
    done
    rm -rf "$job_dir"
}

verify_results() {
    s3_get "datanet-results/demo/$DECK.dat" "$WORK/$DECK.dat"
    zcat "$CCX_TESTS/$DECK.dat.ref.gz" >"$WORK/$DECK.dat.ref"
    diff -q "$WORK/$DECK.dat" "$WORK/$DECK.dat.ref"
}

view_results() {
    local share_dir="$DATANET_SHARES_DIR/smoke"
    s3_get "datanet-results/demo/$DECK.frd" "$share_dir/$DECK.frd"
    smbclient "//127.0.0.1/$DATANET_SMB_SMOKE_SHARE" -p "$DATANET_SMB_PORT" -N -m SMB3 \
        -c "ls $DECK.frd" | grep -q "$DECK.frd"
}

run_flow() {
    WORK=$(mktemp -d /tmp/datanet-demo.XXXXXX)
    step "upload model $DECK.inp to s3://datanet-models" upload_model
    step "solve $DECK with ccx under Slurm (cluster a)" solve
    step "verify $DECK.dat against $DECK.dat.ref" verify_results
    step "view $DECK.frd over SMB (port $DATANET_SMB_PORT)" view_results
    rm -rf "$WORK"
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
