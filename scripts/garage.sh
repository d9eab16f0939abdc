#!/usr/bin/env bash
# Garage S3 server for the datanet stack: one node, replication factor 1, everything under
# $DATANET_RUN_DIR/garage, listening on 127.0.0.1 only. Metadata is kept in SQLite unless
# DATANET_GARAGE_DB_ENGINE=lmdb, and a run directory whose metadata exists keeps its engine.
# LMDB costs Garage about half the CPU per request, but it rejects object keys longer than
# about 480 bytes (an estimate: LMDB keys are at most 511 bytes, and Garage adds its own
# prefix). Such a PUT fails with MDB_BAD_VALSIZE (HTTP 503), and S3 keys reach 1024 bytes.
#
#   garage.sh start         start the node, apply the layout, create the stack's key and buckets
#   garage.sh stop          stop the node this run directory started
#   garage.sh status        exit 0 if the node responds
#   garage.sh bucket NAME   create bucket NAME (idempotent) and grant it to the stack's key
#
# The secret key is written to $RUN/garage/secret_access_key (0600) and never printed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

GARAGE_DIR="$RUN/garage"
GARAGE_CONFIG="$GARAGE_DIR/garage.toml"
KEY_NAME=datanet-stack
STACK_BUCKETS=(datanet-models datanet-results datanet-test)

garage_cli() {
    "$DATANET_GARAGE" -c "$GARAGE_CONFIG" "$@"
}

require_binary() {
    [[ -x $DATANET_GARAGE ]] ||
        die "Garage binary $DATANET_GARAGE is missing; run scripts/setup.sh (it builds and caches it)"
}

# Prints the metadata engine: that of an existing database, else the requested one.
# Garage started with another engine than its database would begin an empty store.
db_engine() {
    local requested=${DATANET_GARAGE_DB_ENGINE:-sqlite} existing=""
    case $requested in
        lmdb | sqlite) ;;
        *) die "invalid DATANET_GARAGE_DB_ENGINE=$requested: use lmdb or sqlite" ;;
    esac
    if [[ -e $GARAGE_DIR/meta/db.sqlite ]]; then
        existing=sqlite
    elif [[ -e $GARAGE_DIR/meta/db.lmdb ]]; then
        existing=lmdb
    fi
    if [[ -n $existing && -n ${DATANET_GARAGE_DB_ENGINE:-} && $existing != "$requested" ]]; then
        die "Garage metadata in $GARAGE_DIR/meta is $existing, not $requested: unset DATANET_GARAGE_DB_ENGINE, or stop the stack and remove $GARAGE_DIR to start an empty store"
    fi
    echo "${existing:-$requested}"
}

write_config() {
    mkdir -p "$GARAGE_DIR/meta" "$GARAGE_DIR/data"
    local engine
    engine=$(db_engine)
    chmod 700 "$GARAGE_DIR"
    [[ -s $GARAGE_DIR/rpc_secret ]] || random_hex32 | write_private "$GARAGE_DIR/rpc_secret"
    [[ -s $GARAGE_DIR/admin_token ]] || random_hex32 | write_private "$GARAGE_DIR/admin_token"
    [[ -s $GARAGE_DIR/metrics_token ]] || random_hex32 | write_private "$GARAGE_DIR/metrics_token"

    cat >"$GARAGE_CONFIG.tmp" <<EOF
# Written by scripts/garage.sh; regenerated on every start.
metadata_dir = "$GARAGE_DIR/meta"
data_dir = "$GARAGE_DIR/data"
db_engine = "$engine"
replication_factor = 1

rpc_bind_addr = "127.0.0.1:$DATANET_GARAGE_RPC_PORT"
rpc_public_addr = "127.0.0.1:$DATANET_GARAGE_RPC_PORT"
rpc_secret_file = "$GARAGE_DIR/rpc_secret"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$DATANET_S3_PORT"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$DATANET_GARAGE_ADMIN_PORT"
admin_token_file = "$GARAGE_DIR/admin_token"
metrics_token_file = "$GARAGE_DIR/metrics_token"
EOF
    mv -f "$GARAGE_CONFIG.tmp" "$GARAGE_CONFIG"
}

running_pid() {
    service_pid garage "$DATANET_GARAGE" "$GARAGE_CONFIG"
}

# Waits until the node responds to RPC from the CLI, not only on its S3 port.
wait_ready() {
    local i
    for ((i = 0; i < 150; i++)); do
        if garage_cli status >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    show_log_tail garage
    die "Garage listens but does not respond to \`garage status\` within 30s; see $RUN/logs/garage.log"
}

# Assigns this node a role once; later starts find layout version 1 or higher.
apply_layout() {
    if garage_cli layout show 2>/dev/null | grep -q '^Current cluster layout version: 0$'; then
        local node_id
        node_id=$(garage_cli node id -q 2>/dev/null | cut -d@ -f1)
        [[ -n $node_id ]] || die "cannot read the Garage node id from \`garage node id\`"
        info "assigning layout to node ${node_id:0:16}"
        garage_cli layout assign -z dc1 -c 10G "$node_id" >/dev/null
        garage_cli layout apply --version 1 >/dev/null
    fi
}

# Creates the stack's access key once and stores its id and secret.
ensure_key() {
    if ! garage_cli key info "$KEY_NAME" --key-id >/dev/null 2>&1; then
        info "creating access key $KEY_NAME"
        garage_cli key create "$KEY_NAME" >/dev/null
    fi
    local key_id secret
    key_id=$(garage_cli key info "$KEY_NAME" --key-id) || die "cannot read the id of Garage key $KEY_NAME"
    key_id=${key_id//[[:space:]]/}
    [[ $key_id =~ ^GK[0-9a-f]+$ ]] || die "unexpected id \"$key_id\" of Garage key $KEY_NAME"
    # The secret stays in a shell variable and goes to the file through a builtin, so it
    # never appears in an argument list or on the terminal.
    secret=$(garage_cli key info "$KEY_NAME" --secret-key 2>/dev/null) || die "cannot read the secret of Garage key $KEY_NAME"
    secret=${secret//[[:space:]]/}
    [[ -n $secret && $secret != "(redacted)" ]] || die "Garage returned no secret for key $KEY_NAME"

    printf '%s\n' "$key_id" >"$GARAGE_DIR/access_key_id.tmp"
    mv -f "$GARAGE_DIR/access_key_id.tmp" "$GARAGE_DIR/access_key_id"
    printf '%s\n' "$secret" | write_private "$GARAGE_DIR/secret_access_key"
}

require_valid_bucket_name() {
    [[ $1 =~ ^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$ ]] ||
        die "invalid bucket name \"$1\": use 3 to 63 lowercase letters, digits, '.' and '-', starting and ending with a letter or digit"
}

ensure_bucket() {
    local bucket=$1
    require_valid_bucket_name "$bucket"
    if ! garage_cli bucket info "$bucket" >/dev/null 2>&1; then
        # A concurrent caller may have created it in between; only a bucket that still
        # does not exist afterwards is an error.
        local output
        if ! output=$(garage_cli bucket create "$bucket" 2>&1); then
            garage_cli bucket info "$bucket" >/dev/null 2>&1 ||
                die "cannot create bucket $bucket: $output"
        fi
    fi
    garage_cli bucket allow --read --write --owner "$bucket" --key "$KEY_NAME" >/dev/null
}

cmd_start() {
    require_root
    check_run_dir
    require_binary
    load_ports
    mkdir -p "$RUN"

    if running_pid >/dev/null; then
        info "Garage already running (pid $(running_pid))"
    else
        require_port_free "$DATANET_S3_PORT" "Garage S3 API" DATANET_S3_PORT
        require_port_free "$DATANET_GARAGE_RPC_PORT" "Garage RPC" DATANET_GARAGE_RPC_PORT
        require_port_free "$DATANET_GARAGE_ADMIN_PORT" "Garage admin API" DATANET_GARAGE_ADMIN_PORT
        write_config
        info "starting Garage on 127.0.0.1:$DATANET_S3_PORT"
        start_daemon garage "$DATANET_GARAGE" -c "$GARAGE_CONFIG" server
        wait_for_port "$DATANET_S3_PORT" "Garage S3 API" garage 60
    fi

    wait_ready
    apply_layout
    ensure_key
    local bucket
    for bucket in "${STACK_BUCKETS[@]}"; do
        ensure_bucket "$bucket"
    done
    info "Garage ready: http://127.0.0.1:$DATANET_S3_PORT region garage, key $(cat "$GARAGE_DIR/access_key_id")"
}

cmd_stop() {
    check_run_dir
    stop_daemon garage "$DATANET_GARAGE" "$GARAGE_CONFIG" 20
}

cmd_status() {
    check_run_dir
    local pid
    if pid=$(running_pid) && garage_cli status >/dev/null 2>&1; then
        echo "garage: running (pid $pid)"
    else
        echo "garage: stopped"
        return 3
    fi
}

cmd_bucket() {
    [[ $# -eq 1 ]] || die "usage: $0 bucket NAME"
    require_valid_bucket_name "$1"
    check_run_dir
    require_binary
    running_pid >/dev/null || die "Garage of $RUN is not running; run scripts/stack.sh up first"
    ensure_bucket "$1"
    echo "$1"
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    bucket) shift; cmd_bucket "$@" ;;
    *) die "usage: $0 start|stop|status|bucket NAME" ;;
esac
