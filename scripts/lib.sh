# shellcheck shell=bash
# Shared by the service scripts (garage.sh, slurm.sh, samba.sh, stack.sh): the run
# directory, the ports, PID files and port checks. Sourced, never executed.
#
# Invariant: a script stops a process only through the PID file it wrote itself, and
# only while that PID's command line still names the expected binary and a path inside
# this run directory. Processes of other stacks or other users are never touched.

# The directory that contains every configuration, state, log and PID file of one stack.
DATANET_RUN_DIR=${DATANET_RUN_DIR:-/var/tmp/datanet-run}
DATANET_RUN_DIR=${DATANET_RUN_DIR%/}
RUN=$DATANET_RUN_DIR

# Where the Garage binary is cached between runs (setup.sh builds it there).
DATANET_GARAGE_ROOT=${DATANET_GARAGE_ROOT:-/var/cache/datanet/garage}
DATANET_GARAGE=${DATANET_GARAGE:-$DATANET_GARAGE_ROOT/bin/garage}

SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPTS_DIR/.." && pwd)

# Prints one progress line on stderr, prefixed by the calling script's name.
info() {
    printf '%s: %s\n' "$(basename "$0" .sh)" "$*" >&2
}

# Prints an error on stderr and exits non-zero.
die() {
    printf '%s: error: %s\n' "$(basename "$0" .sh)" "$*" >&2
    exit 1
}

require_root() {
    [[ $(id -u) -eq 0 ]] || die "run as root (the services run as root on loopback): sudo $0 $*"
}

# The run directory ends up in configuration files and TOML strings, so it is limited
# to characters that need no quoting anywhere.
check_run_dir() {
    [[ $RUN == /* ]] || die "DATANET_RUN_DIR=$RUN is not an absolute path"
    [[ $RUN =~ ^[A-Za-z0-9._/-]+$ ]] ||
        die "DATANET_RUN_DIR=$RUN has characters other than letters, digits, '.', '_', '-' and '/'"
    [[ $RUN != / ]] || die "DATANET_RUN_DIR must not be /"
}

# ---------------------------------------------------------------------------
# Ports: environment override, then the value saved by the last `up` of this run
# directory, then the default.

PORT_VARS=(
    DATANET_S3_PORT DATANET_GARAGE_RPC_PORT DATANET_GARAGE_ADMIN_PORT
    DATANET_SLURMCTLD_PORT_A DATANET_SLURMD_PORT_A
    DATANET_SLURMCTLD_PORT_B DATANET_SLURMD_PORT_B
    DATANET_SMB_PORT
)

load_ports() {
    local saved="$RUN/ports.env" var line name value
    if [[ -r $saved ]]; then
        while IFS= read -r line; do
            name=${line%%=*}
            value=${line#*=}
            for var in "${PORT_VARS[@]}"; do
                if [[ $name == "$var" && -z ${!var:-} ]]; then
                    printf -v "$var" '%s' "$value"
                fi
            done
        done <"$saved"
    fi

    DATANET_S3_PORT=${DATANET_S3_PORT:-3900}
    DATANET_GARAGE_RPC_PORT=${DATANET_GARAGE_RPC_PORT:-3901}
    DATANET_GARAGE_ADMIN_PORT=${DATANET_GARAGE_ADMIN_PORT:-3903}
    DATANET_SLURMCTLD_PORT_A=${DATANET_SLURMCTLD_PORT_A:-6817}
    DATANET_SLURMD_PORT_A=${DATANET_SLURMD_PORT_A:-6818}
    DATANET_SLURMCTLD_PORT_B=${DATANET_SLURMCTLD_PORT_B:-6827}
    DATANET_SLURMD_PORT_B=${DATANET_SLURMD_PORT_B:-6828}
    DATANET_SMB_PORT=${DATANET_SMB_PORT:-4455}

    for var in "${PORT_VARS[@]}"; do
        value=${!var}
        [[ $value =~ ^[0-9]+$ ]] && ((value >= 1 && value <= 65535)) ||
            die "$var=$value is not a TCP port number (1-65535)"
        export "${var?}"
    done
    export DATANET_RUN_DIR
}

save_ports() {
    local var tmp="$RUN/ports.env.tmp"
    : >"$tmp"
    for var in "${PORT_VARS[@]}"; do
        printf '%s=%s\n' "$var" "${!var}" >>"$tmp"
    done
    mv -f "$tmp" "$RUN/ports.env"
}

# Describes who listens on TCP port $1 on any local address, or prints nothing.
port_listener() {
    local port=$1
    ss -Hltnp "sport = :$port" 2>/dev/null | head -n 1
}

# Fails with a message naming the port and the service if something already listens.
require_port_free() {
    local port=$1 service=$2 var=$3 who
    who=$(port_listener "$port")
    if [[ -n $who ]]; then
        local users
        users=$(grep -o 'users:(.*)' <<<"$who" || true)
        die "port $port needed by $service is already in use${users:+ ($users)}; stop that process or choose another port with $var=PORT"
    fi
}

# Waits until TCP port $1 listens; fails early if the service's process died.
wait_for_port() {
    local port=$1 service=$2 name=$3 timeout_s=${4:-60} i
    for ((i = 0; i < timeout_s * 5; i++)); do
        if [[ -n $(port_listener "$port") ]]; then
            return 0
        fi
        if ! recorded_pid_alive "$name"; then
            show_log_tail "$name"
            die "$service exited during start-up; see $RUN/logs/$name.log"
        fi
        sleep 0.2
    done
    show_log_tail "$name"
    die "$service did not listen on 127.0.0.1:$port within ${timeout_s}s; see $RUN/logs/$name.log"
}

show_log_tail() {
    local log="$RUN/logs/$1.log"
    if [[ -r $log ]]; then
        printf '%s\n' "--- last lines of $log ---" >&2
        tail -n 15 "$log" >&2 || true
    fi
}

# ---------------------------------------------------------------------------
# PID files. $RUN/pids/NAME.pid contains the PID of a process started with setsid, so
# that process also leads its own process group.

# Prints the PID of service NAME if its process is alive, not a zombie, runs BINARY
# and has MARKER (a path inside the run directory) in its command line.
service_pid() {
    local name=$1 binary=$2 marker=$3 pidfile="$RUN/pids/$1.pid" pid cmdline state
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $state != Z ]] || return 1
    [[ $cmdline == *"$binary"* && $cmdline == *"$marker"* ]] || return 1
    printf '%s\n' "$pid"
}

# True while the process recorded for NAME exists and is not a zombie, whatever it runs.
# Start-up checks use it because the daemon's own exec may not have happened yet.
recorded_pid_alive() {
    local pidfile="$RUN/pids/$1.pid" pid state
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z ]]
}

# Starts a long-running foreground process in its own session, with no inherited file
# descriptors beyond stdin/stdout/stderr, logging to $RUN/logs/NAME.log.
start_daemon() {
    local name=$1
    shift
    local log="$RUN/logs/$name.log"
    mkdir -p "$RUN/logs" "$RUN/pids"
    printf '==== %s start: %s\n' "$(date -u +%FT%TZ)" "$*" >>"$log"
    # The daemon keeps no descriptor beyond 0-2, so that a lock held by this script or
    # a caller's pipe never stays open for the daemon's lifetime.
    (
        for fd in /proc/$BASHPID/fd/*; do
            fd=${fd##*/}
            if ((fd > 2)); then
                eval "exec $fd>&-"
            fi
        done 2>/dev/null
        exec setsid "$@" </dev/null >>"$log" 2>&1
    ) &
    printf '%s\n' "$!" >"$RUN/pids/$name.pid"
}

# Stops service NAME if it is ours: SIGTERM to its process group, SIGKILL after a grace
# period. A stale PID file (dead process or a reused PID) is removed without signals.
stop_daemon() {
    local name=$1 binary=$2 marker=$3 grace_s=${4:-15} pid i
    if ! pid=$(service_pid "$name" "$binary" "$marker"); then
        rm -f "$RUN/pids/$name.pid"
        return 0
    fi

    info "stopping $name (pid $pid)"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace_s * 5; i++)); do
        service_pid "$name" "$binary" "$marker" >/dev/null || break
        sleep 0.2
    done
    if service_pid "$name" "$binary" "$marker" >/dev/null; then
        info "$name (pid $pid) ignored SIGTERM for ${grace_s}s; sending SIGKILL"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    # Helpers left in the process group (for example smbd children) go too.
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$RUN/pids/$name.pid"
}

# Holds an exclusive lock on the run directory for the rest of the calling script,
# so that two `up` or `down` runs on the same directory never interleave.
lock_run_dir() {
    mkdir -p "$RUN"
    exec {DATANET_LOCK_FD}>"$RUN/.lock"
    flock -w 600 "$DATANET_LOCK_FD" || die "timed out after 10 minutes waiting for $RUN/.lock, which another stack.sh run has locked"
}

# Writes stdin to FILE with mode 0600, atomically.
write_private() {
    local file=$1 tmp
    tmp=$(mktemp "$file.XXXXXX")
    chmod 600 "$tmp"
    cat >"$tmp"
    mv -f "$tmp" "$file"
}

# 32 random bytes as 64 hex characters.
random_hex32() {
    od -An -N32 -tx1 /dev/urandom | tr -d ' \n'
}
