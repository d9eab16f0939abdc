#!/usr/bin/env bash
# Benchmarks datanet, jobwrap and samba-provisioner against rclone mount, s3fs, direct
# GETs, `rclone copy` and plain `sbatch`, all on one Garage server, and writes the
# results page docs/BENCHMARKS.md. Run as root on Debian 12. Not part of the tests.
#
#   scripts/bench.sh [--quick] [--only SECTION[,SECTION...]] [--output FILE] [--no-build] [--keep-stack]
#
#   --quick        small sizes and one run per figure, for iterating (about 3 minutes);
#                  writes $RUN/bench/BENCHMARKS-quick.md unless --output is given
#   --only LIST    run only these sections (read random cache write find stagein jobwrap samba).
#                  Their results replace the same sections of the previous run of that mode.
#   --output FILE  the page to write (default docs/BENCHMARKS.md for a full run)
#   --no-build     use the release binaries already in target/release
#   --keep-stack   leave the benchmark's service stack running afterwards
#
# The benchmark runs its own service stack in ${DATANET_BENCH_RUN_DIR:-/var/tmp/datanet-bench}
# on its own ports (S3 33900, RPC 33901, admin 33903, slurmctld 36817, slurmd 36818,
# SMB 34455; move them with DATANET_BENCH_S3_PORT and the like), so its traffic never
# touches the stack that tests use. A full run takes about 20 minutes on 2 cores.
set -euo pipefail

DATANET_RUN_DIR=${DATANET_BENCH_RUN_DIR:-/var/tmp/datanet-bench}
export DATANET_RUN_DIR

# Two runs at once would share the benchmark stack and the results page, and each
# would disturb the other's figures: a second run waits for the first.
mkdir -p "$DATANET_RUN_DIR"
exec 8>"$DATANET_RUN_DIR.lock"
if ! flock -n 8; then
    echo "bench: another benchmark run holds $DATANET_RUN_DIR.lock; waiting for it" >&2
    flock 8
fi
# Always the benchmark's own ports, even when the caller sourced a test stack's env.sh.
export DATANET_S3_PORT=${DATANET_BENCH_S3_PORT:-33900}
export DATANET_GARAGE_RPC_PORT=${DATANET_BENCH_GARAGE_RPC_PORT:-33901}
export DATANET_GARAGE_ADMIN_PORT=${DATANET_BENCH_GARAGE_ADMIN_PORT:-33903}
export DATANET_SLURMCTLD_PORT_A=${DATANET_BENCH_SLURMCTLD_PORT:-36817}
export DATANET_SLURMD_PORT_A=${DATANET_BENCH_SLURMD_PORT:-36818}
export DATANET_SLURMCTLD_PORT_B=${DATANET_BENCH_SLURMCTLD_PORT_B:-36827}
export DATANET_SLURMD_PORT_B=${DATANET_BENCH_SLURMD_PORT_B:-36828}
export DATANET_SMB_PORT=${DATANET_BENCH_SMB_PORT:-34455}
# The benchmark's keys are short, so a new benchmark store uses LMDB, the engine that costs
# Garage less CPU (scripts/garage.sh explains its key length limit). An existing store
# keeps its engine, and the results page names it.
if [[ -z ${DATANET_GARAGE_DB_ENGINE:-} && ! -e $DATANET_RUN_DIR/garage/meta/db.sqlite ]]; then
    export DATANET_GARAGE_DB_ENGINE=lmdb
fi
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BENCH_BUCKET=datanet-bench
BINARIES=(datanet jobwrap samba-provisioner)
PEER_PACKAGES=(rclone s3fs)

usage() {
    sed -n '6,14p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

quick=0
only=""
output=""
build=1
keep_stack=0
original_args="$*"
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) quick=1 ;;
        --only)
            [[ $# -ge 2 ]] || die "--only needs a comma-separated list of sections"
            only=$2
            shift
            ;;
        --output)
            [[ $# -ge 2 ]] || die "--output needs a file name"
            output=$2
            shift
            ;;
        --no-build) build=0 ;;
        --keep-stack) keep_stack=1 ;;
        -h | --help) usage ;;
        *) die "unknown option \"$1\"; see $0 --help" ;;
    esac
    shift
done

SECTIONS=(read random cache write find stagein jobwrap samba)
if [[ -n $only ]]; then
    IFS=, read -ra requested <<<"$only"
    for section in "${requested[@]}"; do
        [[ " ${SECTIONS[*]} " == *" $section "* ]] ||
            die "unknown section \"$section\" in --only; choose from: ${SECTIONS[*]}"
    done
fi

require_root
check_run_dir
export PATH="$HOME/.cargo/bin:$PATH"
cd "$REPO_DIR"
BENCH_DIR="$RUN/bench"
mkdir -p "$BENCH_DIR/logs"

if ((quick)); then
    mode=quick
    output=${output:-$BENCH_DIR/BENCHMARKS-quick.md}
else
    mode=full
    output=${output:-$REPO_DIR/docs/BENCHMARKS.md}
fi
results="$BENCH_DIR/results-$mode.json"

install_peers() {
    local missing=() package
    for package in "${PEER_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$package")
        fi
    done
    ((${#missing[@]} > 0)) || return 0
    info "installing the peers ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${missing[@]}"
}

# Builds each binary on its own, so one that does not compile only removes its sections.
# Each binary is copied to $BENCH_DIR/bin, so a build started by someone else during the
# run cannot swap it. Writes $BENCH_DIR/binaries.json: {"NAME": {"ok": bool, "path" or "reason": ...}}.
build_binaries() {
    local name log entries=() path built
    mkdir -p "$BENCH_DIR/bin"
    for name in "${BINARIES[@]}"; do
        built="$REPO_DIR/target/release/$name"
        path="$BENCH_DIR/bin/$name"
        log="$BENCH_DIR/logs/build-$name.log"
        if ((build)); then
            info "building $name (release)"
            if cargo build --release -p "$name" >"$log" 2>&1 && cp -f "$built" "$path"; then
                entries+=("\"$name\": {\"ok\": true, \"path\": \"$path\"}")
            else
                local first_error
                first_error=$(grep -m 1 -E '^error' "$log" | tr -d '"\\' || true)
                entries+=("\"$name\": {\"ok\": false, \"reason\": \"cargo build --release -p $name failed: ${first_error:-see $log}\"}")
                info "building $name failed; its sections are recorded as not measured (log: $log)"
            fi
        elif [[ -x $built ]] && cp -f "$built" "$path"; then
            entries+=("\"$name\": {\"ok\": true, \"path\": \"$path\", \"prebuilt\": true}")
        else
            entries+=("\"$name\": {\"ok\": false, \"reason\": \"$built is missing and --no-build was given\"}")
        fi
    done
    local IFS=,
    printf '{%s}\n' "${entries[*]}" >"$BENCH_DIR/binaries.json"
}

# Unmounts whatever a crashed run left below the benchmark's mount points.
unmount_leftovers() {
    local mountpoint
    for mountpoint in "$BENCH_DIR"/mnt/*; do
        if [[ -d $mountpoint ]] && mountpoint -q "$mountpoint"; then
            info "unmounting $mountpoint left by an earlier run"
            umount "$mountpoint" 2>/dev/null || umount -l "$mountpoint" || true
        fi
    done
}

stack_was_up=0
finish() {
    local rc=$?
    unmount_leftovers
    if ((stack_was_up == 0 && keep_stack == 0)); then
        bash "$SCRIPTS_DIR/stack.sh" down >/dev/null 2>&1 || info "stopping the benchmark stack failed; run DATANET_RUN_DIR=$RUN scripts/stack.sh down"
    fi
    exit "$rc"
}

info "mode $mode, run directory $RUN, page $output"
bash "$SCRIPTS_DIR/setup.sh"
install_peers
build_binaries

if bash "$SCRIPTS_DIR/stack.sh" status >/dev/null 2>&1; then
    stack_was_up=1
fi
trap finish EXIT
unmount_leftovers
bash "$SCRIPTS_DIR/stack.sh" up
bash "$SCRIPTS_DIR/garage.sh" bucket "$BENCH_BUCKET" >/dev/null

python=/usr/bin/python3
[[ -x $python ]] || python=python3
mode_args=()
((quick == 0)) || mode_args=(--quick)
"$python" "$SCRIPTS_DIR/bench/run.py" \
    --repo "$REPO_DIR" \
    --run-dir "$RUN" \
    --binaries "$BENCH_DIR/binaries.json" \
    --garage "$DATANET_GARAGE" \
    "${mode_args[@]}" \
    --only "$only" \
    --output "$output" \
    --results "$results" \
    --command-line "scripts/bench.sh${original_args:+ $original_args}"
info "results page: $output"
