# shellcheck shell=bash
# Runs the flow's steps: one line per step with its time on standard error, the
# commands' own output in $LOG, and the summary table at the end. Sourced by flow.sh.
#
# A step that fails stops the flow. A check that fails is reported and the flow goes
# on, so that one bad result does not hide the others. Either makes the exit code
# non-zero.

FAILED_STEPS=0
STAGE_PID=
STARTED_MS=$(($(date +%s%N) / 1000000))

# Counters for the summary. Stages run in a subshell, so they add "KEY VALUE" lines to
# this file with `count`, and the summary adds them up.
STATS=$(mktemp /tmp/datanet-flow-stats.XXXXXX)

count() {
    printf '%s %s\n' "$1" "$2" >>"$STATS"
}

counted() {
    awk -v key="$1" '$1 == key { sum += $2 } END { printf "%d", sum }' "$STATS"
}

format_elapsed() {
    local elapsed_ms=$1
    printf '%d.%d' $((elapsed_ms / 1000)) $((elapsed_ms % 1000 / 100))
}

run_step() {
    local fatal=$1 name=$2 started_ms rc=0 log_start
    shift 2
    started_ms=$(($(date +%s%N) / 1000000))
    log_start=$(($(wc -l <"$LOG") + 1))
    printf '%-52s ' "$name" >&2
    printf '\n==== %s: %s\n' "$(date -u +%T)" "$name" >>"$LOG"
    # The stage runs in the background and is waited for, because errexit is ignored in
    # a function called from a `||` list, even in a subshell. So every command of a
    # stage that fails also fails the stage.
    "$@" >>"$LOG" 2>&1 &
    STAGE_PID=$!
    wait "$STAGE_PID" || rc=$?
    STAGE_PID=
    local elapsed
    elapsed=$(format_elapsed $(($(date +%s%N) / 1000000 - started_ms)))
    if ((rc == 0)); then
        printf 'ok   (%ss)\n' "$elapsed" >&2
        return 0
    fi

    printf 'FAIL (%ss)\n' "$elapsed" >&2
    FAILED_STEPS=$((FAILED_STEPS + 1))
    printf '     --- last lines of this step in %s ---\n' "$LOG" >&2
    tail -n "+$log_start" "$LOG" | tail -n 12 | sed 's/^/     /' >&2
    if ((fatal)); then
        exit 1
    fi
}

# Runs a step that the rest of the flow needs; a failure ends the flow.
step() {
    run_step 1 "$@"
}

# Runs a check; a failure is counted and the flow goes on.
check() {
    run_step 0 "$@"
}

# Fails the current stage with a message in the log.
fail() {
    printf 'check failed: %s\n' "$*"
    return 1
}

print_summary() {
    local total
    total=$(format_elapsed $(($(date +%s%N) / 1000000 - STARTED_MS)))
    {
        printf '\n%-22s %s\n' "summary" "flow $NAME, mount $MOUNTPOINT"
        printf '%-22s %s\n' "jobs run" \
            "$(counted jobs) ($(counted completed) completed, $(counted failed_as_intended) failed as intended)"
        printf '%-22s %s\n' "uploaded via mount" "$(counted uploaded_files) files, $(counted uploaded_bytes) bytes"
        printf '%-22s %s\n' "bytes staged in" "$(counted staged_in_bytes) ($(counted staged_in_files) files)"
        printf '%-22s %s\n' "bytes staged out" "$(counted staged_out_bytes) ($(counted staged_out_files) files)"
        printf '%-22s %s\n' "results verified" \
            "$(counted dat_verified)/${#DECKS[@]} .dat files match their .dat.ref"
        printf '%-22s %s\n' "SMB share" \
            "$(counted smb_downloads) downloaded, $(counted smb_uploads) uploaded, $(counted smb_rejected) rejected after revoke"
        printf '%-22s %s\n' "failed steps" "$FAILED_STEPS"
        printf '%-22s %ss\n' "total time" "$total"
        printf '%-22s %s\n' "log" "$LOG"
    } >&2
}

# Stops the stage that an interrupt left running, so that the teardown does not race it.
stop_running_stage() {
    if [[ -n $STAGE_PID ]] && kill -0 "$STAGE_PID" 2>/dev/null; then
        echo "interrupted: stopping the running step (pid $STAGE_PID)" >&2
        kill -TERM "$STAGE_PID" 2>/dev/null || true
        wait "$STAGE_PID" 2>/dev/null || true
    fi
    STAGE_PID=
}

finish() {
    local rc=$?
    trap - EXIT
    stop_running_stage
    if ((KEEP)); then
        printf '%-52s %s\n' "tear down" "skipped (--keep): $MOUNTPOINT and $WORK stay" >&2
    else
        run_step 0 "tear down: unmount, delete the buckets" teardown
    fi
    ((FAILED_STEPS == 0)) || rc=1
    print_summary
    rm -f "$STATS"
    if ((rc == 0)); then
        echo "flow finished: every check passed" >&2
    else
        echo "flow FAILED (exit $rc); details in $LOG" >&2
    fi
    exit "$rc"
}
