#!/usr/bin/env bash
# munge + Slurm for the datanet stack: a private munged (own key and socket) and up to
# two independent single-node clusters, `a` and `b`, each with its own slurm.conf,
# ports, StateSaveLocation and spool under $DATANET_RUN_DIR/slurm/NAME. The system's
# /etc/slurm and /etc/munge are never read or changed.
#
#   slurm.sh start [--cluster a|b]   start munged and the cluster (default a)
#   slurm.sh stop  [--cluster a|b]   stop the cluster (default all); munged stops with the last one
#   slurm.sh status [--cluster a|b]  exit 0 if every cluster asked for (default all started) is up
#
# Commands pick a cluster with SLURM_CONF=$RUN/slurm/NAME/slurm.conf.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MUNGE_DIR="$RUN/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
CLUSTERS=(a b)

# ---------------------------------------------------------------------------
# munge

munged_pid() {
    service_pid munged munged "$MUNGE_SOCKET"
}

start_munge() {
    if munged_pid >/dev/null; then
        return 0
    fi

    mkdir -p "$MUNGE_DIR"
    chmod 755 "$MUNGE_DIR"
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        head -c 1024 /dev/urandom | write_private "$MUNGE_DIR/munge.key"
    fi
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"

    info "starting munged (socket $MUNGE_SOCKET)"
    start_daemon munged munged --foreground --force \
        --socket="$MUNGE_SOCKET" \
        --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_DIR/munged.pid" \
        --seed-file="$MUNGE_DIR/munged.seed" \
        --log-file="$RUN/logs/munged.log"

    local i
    for ((i = 0; i < 100; i++)); do
        if [[ -S $MUNGE_SOCKET ]] && munge -S "$MUNGE_SOCKET" -n 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; then
            return 0
        fi
        recorded_pid_alive munged || break
        sleep 0.2
    done
    show_log_tail munged
    die "munged did not respond on $MUNGE_SOCKET within 20s; see $RUN/logs/munged.log"
}

stop_munge() {
    stop_daemon munged munged "$MUNGE_SOCKET" 10
}

# ---------------------------------------------------------------------------
# One cluster

# Sets CTLD_PORT, SLURMD_PORT, CLUSTER_DIR, CONF and NODE for cluster $1.
select_cluster() {
    local cluster=$1
    case $cluster in
        a)
            CTLD_PORT=$DATANET_SLURMCTLD_PORT_A
            SLURMD_PORT=$DATANET_SLURMD_PORT_A
            ;;
        b)
            CTLD_PORT=$DATANET_SLURMCTLD_PORT_B
            SLURMD_PORT=$DATANET_SLURMD_PORT_B
            ;;
        *) die "unknown cluster \"$cluster\": use --cluster a or --cluster b" ;;
    esac
    CLUSTER_DIR="$RUN/slurm/$cluster"
    CONF="$CLUSTER_DIR/slurm.conf"
    NODE="node-$cluster"
}

ctld_pid() {
    service_pid "slurmctld-$1" slurmctld "$RUN/slurm/$1/slurm.conf"
}

slurmd_pid() {
    service_pid "slurmd-$1" slurmd "$RUN/slurm/$1/slurm.conf"
}

# The node's hardware as slurmd detects it, e.g. "CPUs=2 Boards=1 ... RealMemory=24105".
detected_hardware() {
    slurmd -C 2>/dev/null | head -n 1 | sed -E 's/^NodeName=[^ ]+ //'
}

write_slurm_conf() {
    local cluster=$1 host hardware
    host=$(hostname -s)
    hardware=$(detected_hardware)
    [[ $hardware == *CPUs=* ]] || die "\`slurmd -C\` did not report this node's CPUs; is slurmd installed? (scripts/setup.sh)"
    mkdir -p "$CLUSTER_DIR/state" "$CLUSTER_DIR/spool"
    : >"$CLUSTER_DIR/plugstack.conf"

    cat >"$CONF.tmp" <<EOF
# Written by scripts/slurm.sh; regenerated on every start of cluster $cluster.
ClusterName=datanet-$cluster
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root

AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge

StateSaveLocation=$CLUSTER_DIR/state
SlurmdSpoolDir=$CLUSTER_DIR/spool
SlurmctldPidFile=$CLUSTER_DIR/slurmctld.pid
SlurmdPidFile=$CLUSTER_DIR/slurmd.pid
PlugStackConfig=$CLUSTER_DIR/plugstack.conf

ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true

# Bind to the configured addresses (127.0.0.1) instead of the wildcard address.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny

ReturnToService=2
SlurmdParameters=config_overrides
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
Waittime=0

NodeName=$NODE NodeHostname=$host NodeAddr=127.0.0.1 $hardware State=UNKNOWN
PartitionName=main Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv -f "$CONF.tmp" "$CONF"
}

node_state() {
    SLURM_CONF=$CONF sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1
}

# Waits until the node is idle (or busy with jobs), resuming it once if it came back
# down or drained from an earlier run's saved state.
wait_node_ready() {
    local cluster=$1 state i resumed=0
    for ((i = 0; i < 300; i++)); do
        state=$(node_state)
        case $state in
            idle* | mixed* | allocated* | completing*) return 0 ;;
            down* | drain* | fail*)
                if ((resumed == 0)) && slurmd_pid "$cluster" >/dev/null; then
                    SLURM_CONF=$CONF scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
                    resumed=1
                fi
                ;;
        esac
        sleep 0.2
    done
    show_log_tail "slurmd-$cluster"
    die "Slurm node $NODE of cluster $cluster is \"${state:-unknown}\" after 60s; see $RUN/logs/slurmctld-$cluster.log and slurmd-$cluster.log"
}

start_cluster() {
    local cluster=$1
    select_cluster "$cluster"

    if ! ctld_pid "$cluster" >/dev/null; then
        # slurmd must not outlive a restarted slurmctld with another configuration.
        stop_daemon "slurmd-$cluster" slurmd "$CONF" 10
        require_port_free "$CTLD_PORT" "slurmctld of cluster $cluster" "DATANET_SLURMCTLD_PORT_${cluster^^}"
        require_port_free "$SLURMD_PORT" "slurmd of cluster $cluster" "DATANET_SLURMD_PORT_${cluster^^}"
        write_slurm_conf "$cluster"
        info "starting slurmctld of cluster $cluster on 127.0.0.1:$CTLD_PORT"
        start_daemon "slurmctld-$cluster" slurmctld -D -f "$CONF"
        wait_for_port "$CTLD_PORT" "slurmctld of cluster $cluster" "slurmctld-$cluster" 60
    fi

    if ! slurmd_pid "$cluster" >/dev/null; then
        require_port_free "$SLURMD_PORT" "slurmd of cluster $cluster" "DATANET_SLURMD_PORT_${cluster^^}"
        info "starting slurmd $NODE of cluster $cluster on 127.0.0.1:$SLURMD_PORT"
        start_daemon "slurmd-$cluster" slurmd -D -N "$NODE" -f "$CONF"
        wait_for_port "$SLURMD_PORT" "slurmd of cluster $cluster" "slurmd-$cluster" 60
    fi

    wait_node_ready "$cluster"
    info "Slurm cluster $cluster ready: SLURM_CONF=$CONF"
}

stop_cluster() {
    local cluster=$1
    select_cluster "$cluster"
    stop_daemon "slurmd-$cluster" slurmd "$CONF" 15
    stop_daemon "slurmctld-$cluster" slurmctld "$CONF" 15
}

any_cluster_running() {
    local cluster
    for cluster in "${CLUSTERS[@]}"; do
        if ctld_pid "$cluster" >/dev/null || slurmd_pid "$cluster" >/dev/null; then
            return 0
        fi
    done
    return 1
}

# ---------------------------------------------------------------------------

cmd_start() {
    require_root
    check_run_dir
    load_ports
    command -v slurmctld >/dev/null || die "slurmctld is not installed; run scripts/setup.sh"
    mkdir -p "$RUN"
    start_munge
    start_cluster "${SELECTED:-a}"
}

cmd_stop() {
    check_run_dir
    load_ports
    local cluster
    if [[ -n ${SELECTED:-} ]]; then
        stop_cluster "$SELECTED"
    else
        for cluster in "${CLUSTERS[@]}"; do
            stop_cluster "$cluster"
        done
    fi
    if ! any_cluster_running; then
        stop_munge
    fi
}

cmd_status() {
    check_run_dir
    load_ports
    local cluster failed=0 wanted=()
    if [[ -n ${SELECTED:-} ]]; then
        wanted=("$SELECTED")
    else
        for cluster in "${CLUSTERS[@]}"; do
            [[ -f $RUN/slurm/$cluster/slurm.conf ]] && wanted+=("$cluster")
        done
        ((${#wanted[@]} > 0)) || wanted=(a)
    fi

    if munged_pid >/dev/null; then
        echo "munged: running (pid $(munged_pid))"
    else
        echo "munged: stopped"
        failed=1
    fi
    for cluster in "${wanted[@]}"; do
        select_cluster "$cluster"
        if ctld_pid "$cluster" >/dev/null && slurmd_pid "$cluster" >/dev/null; then
            echo "slurm cluster $cluster: running, node $NODE $(node_state) (SLURM_CONF=$CONF)"
        else
            echo "slurm cluster $cluster: stopped"
            failed=1
        fi
    done
    ((failed == 0)) || return 3
}

COMMAND=${1:-}
shift || true
SELECTED=
while [[ $# -gt 0 ]]; do
    case $1 in
        --cluster)
            [[ $# -ge 2 ]] || die "--cluster needs a value: a or b"
            SELECTED=$2
            shift 2
            ;;
        --cluster=*)
            SELECTED=${1#--cluster=}
            shift
            ;;
        *) die "unknown argument \"$1\"; usage: $0 start|stop|status [--cluster a|b]" ;;
    esac
done
if [[ -n $SELECTED && $SELECTED != a && $SELECTED != b ]]; then
    die "unknown cluster \"$SELECTED\": use --cluster a or --cluster b"
fi

case $COMMAND in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) die "usage: $0 start|stop|status [--cluster a|b]" ;;
esac
