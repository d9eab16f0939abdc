#!/usr/bin/env bash
# The whole datanet service stack under one run directory:
# Garage S3, munge + Slurm (cluster a, optionally b) and Samba.
#
#   stack.sh up [--two-clusters]   start everything (idempotent), write $RUN/env.sh and $RUN/datanet.toml
#   stack.sh down                  stop everything this run directory started (idempotent)
#   stack.sh status                one line per service; exit 0 if all are up
#
# Run directory: ${DATANET_RUN_DIR:-/var/tmp/datanet-run}. Ports can be moved with
# DATANET_S3_PORT, DATANET_GARAGE_RPC_PORT, DATANET_GARAGE_ADMIN_PORT,
# DATANET_SLURMCTLD_PORT_A/_B, DATANET_SLURMD_PORT_A/_B and DATANET_SMB_PORT; the
# values of the last `up` are kept in $RUN/ports.env.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    die "usage: $0 up [--two-clusters] | down | status"
}

cluster_running() {
    bash "$SCRIPTS_DIR/slurm.sh" status --cluster "$1" >/dev/null 2>&1
}

# A 32-byte key (64 hex characters) for samba-provisioner's tokens, generated once.
ensure_token_key() {
    local file="$RUN/samba/token.key"
    mkdir -p "$RUN/samba"
    if [[ ! -s $file ]]; then
        random_hex32 | write_private "$file"
    fi
    chmod 600 "$file"
}

write_config() {
    local two_clusters=$1 access_key_id tmp="$RUN/datanet.toml.tmp"
    access_key_id=$(<"$RUN/garage/access_key_id")
    [[ $access_key_id =~ ^[A-Za-z0-9]+$ ]] || die "unexpected Garage key id in $RUN/garage/access_key_id"

    local space
    {
        cat <<EOF
# datanet configuration for the local service stack.
# Written by scripts/stack.sh up; regenerated on every up. Reference: docs/CONFIGURATION.md
EOF
        for space in models results; do
            cat <<EOF

[spaces.$space]
url = "s3://datanet-$space"
endpoint = "http://127.0.0.1:$DATANET_S3_PORT"
region = "garage"
access_key_id = "$access_key_id"
secret_access_key_file = "$RUN/garage/secret_access_key"
EOF
        done
        cat <<EOF

[spaces.scratchspace]
url = "file://$RUN/spaces/local"

[cache]
dir = "$RUN/cache"

[clusters.a]
slurm_conf = "$RUN/slurm/a/slurm.conf"
scratch_root = "$RUN/scratch/a"
near_spaces = ["models", "results"]
EOF
        if ((two_clusters)); then
            cat <<EOF

[clusters.b]
slurm_conf = "$RUN/slurm/b/slurm.conf"
scratch_root = "$RUN/scratch/b"
near_spaces = ["scratchspace"]
EOF
        fi
        cat <<EOF

[jobwrap]
state_dir = "$RUN/jobwrap"

[samba]
server = "127.0.0.1"
port = $DATANET_SMB_PORT
smb_conf = "$RUN/samba/smb.conf"
allowed_roots = ["/datanet", "$RUN/shares", "/tmp"]
state_dir = "$RUN/samba-provisioner"
token_key_file = "$RUN/samba/token.key"
EOF
    } >"$tmp"
    mv -f "$tmp" "$RUN/datanet.toml"
}

write_env() {
    local two_clusters=$1 tmp="$RUN/env.sh.tmp" var
    {
        cat <<EOF
# Settings of the datanet service stack in $RUN.
# Written by scripts/stack.sh up. Use: source $RUN/env.sh
export DATANET_RUN_DIR=$RUN
export DATANET_CONFIG=$RUN/datanet.toml
export DATANET_S3_ENDPOINT=http://127.0.0.1:$DATANET_S3_PORT
export DATANET_S3_REGION=garage
export DATANET_S3_ACCESS_KEY_ID=$(<"$RUN/garage/access_key_id")
export DATANET_S3_SECRET_FILE=$RUN/garage/secret_access_key
export DATANET_GARAGE=$DATANET_GARAGE
export DATANET_GARAGE_CONFIG=$RUN/garage/garage.toml
export DATANET_MUNGE_SOCKET=$RUN/munge/munge.socket
export DATANET_SLURM_CONF=$RUN/slurm/a/slurm.conf
export DATANET_SCRATCH_ROOT=$RUN/scratch/a
export DATANET_LOCAL_SPACE_DIR=$RUN/spaces/local
export DATANET_SMB_CONF=$RUN/samba/smb.conf
export DATANET_SMB_SMOKE_SHARE=datanet-smoke
export DATANET_SHARES_DIR=$RUN/shares
export DATANET_SAMBA_TOKEN_KEY_FILE=$RUN/samba/token.key
EOF
        if ((two_clusters)); then
            echo "export DATANET_SLURM_CONF_B=$RUN/slurm/b/slurm.conf"
            echo "export DATANET_SCRATCH_ROOT_B=$RUN/scratch/b"
        fi
        for var in "${PORT_VARS[@]}"; do
            echo "export $var=${!var}"
        done
    } >"$tmp"
    mv -f "$tmp" "$RUN/env.sh"
}

cmd_up() {
    local two_clusters=0
    while [[ $# -gt 0 ]]; do
        case $1 in
            --two-clusters) two_clusters=1 ;;
            *) usage ;;
        esac
        shift
    done

    require_root
    check_run_dir
    lock_run_dir
    load_ports

    # Cluster b keeps running across an `up` without --two-clusters, so the files
    # written below describe what actually runs.
    if ((two_clusters == 0)) && cluster_running b; then
        two_clusters=1
    fi

    mkdir -p "$RUN"/{spaces/local,scratch/a,cache,jobwrap,samba-provisioner,shares}
    ((two_clusters == 0)) || mkdir -p "$RUN/scratch/b"

    bash "$SCRIPTS_DIR/garage.sh" start
    bash "$SCRIPTS_DIR/slurm.sh" start --cluster a
    if ((two_clusters)); then
        bash "$SCRIPTS_DIR/slurm.sh" start --cluster b
    fi
    bash "$SCRIPTS_DIR/samba.sh" start

    ensure_token_key
    write_config "$two_clusters"
    write_env "$two_clusters"
    save_ports
    info "stack up in $RUN; use it with: source $RUN/env.sh"
}

cmd_down() {
    [[ $# -eq 0 ]] || usage
    check_run_dir
    if [[ ! -d $RUN ]]; then
        info "nothing to stop: $RUN does not exist"
        return 0
    fi
    lock_run_dir

    # Stop every service even if one of them fails to stop.
    local failed=0
    bash "$SCRIPTS_DIR/samba.sh" stop || failed=1
    bash "$SCRIPTS_DIR/slurm.sh" stop || failed=1
    bash "$SCRIPTS_DIR/garage.sh" stop || failed=1
    ((failed == 0)) || die "some services of $RUN did not stop cleanly; see the messages above"
    info "stack down in $RUN"
}

cmd_status() {
    [[ $# -eq 0 ]] || usage
    check_run_dir
    local failed=0
    bash "$SCRIPTS_DIR/garage.sh" status || failed=1
    bash "$SCRIPTS_DIR/slurm.sh" status || failed=1
    bash "$SCRIPTS_DIR/samba.sh" status || failed=1
    if [[ -r $RUN/env.sh ]]; then
        echo "settings: source $RUN/env.sh"
    fi
    ((failed == 0)) || return 3
}

command=${1:-}
shift || true
case $command in
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    status) cmd_status "$@" ;;
    *) usage ;;
esac
