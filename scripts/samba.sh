#!/usr/bin/env bash
# Samba for the datanet stack: one smbd on 127.0.0.1:${DATANET_SMB_PORT:-4455} with its
# own smb.conf, private dir, lock, state, cache and PID directories under
# $DATANET_RUN_DIR/samba. /etc/samba and the system's Samba state are never used.
#
#   samba.sh start    start smbd
#   samba.sh stop     stop the smbd this run directory started
#   samba.sh status   exit 0 if smbd is running
#
# Shares for leases live in the registry (`registry shares = yes`), so samba-provisioner
# adds and removes them with `net conf -s $RUN/samba/smb.conf ...`, without a reload.
# The fixed share [datanet-smoke] ($RUN/shares/smoke, guest, read-only) lets the smoke
# test list a directory without creating accounts.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SAMBA_DIR="$RUN/samba"
SMB_CONF="$SAMBA_DIR/smb.conf"
SMOKE_SHARE_DIR="$RUN/shares/smoke"

smbd_pid() {
    service_pid smbd smbd "$SMB_CONF"
}

write_smb_conf() {
    local dir
    for dir in private lock state cache pid ncalrpc log; do
        mkdir -p "$SAMBA_DIR/$dir"
    done
    chmod 700 "$SAMBA_DIR/private"
    mkdir -p "$SMOKE_SHARE_DIR"
    echo "datanet smoke test file" >"$SMOKE_SHARE_DIR/README.txt"

    cat >"$SMB_CONF.tmp" <<EOF
# Written by scripts/samba.sh; regenerated on every start. Lease shares are not kept
# here but in the registry (net conf -s $SMB_CONF list).
[global]
    server role = standalone server
    workgroup = DATANET
    netbios name = DATANET
    server string = datanet
    interfaces = 127.0.0.1
    bind interfaces only = yes
    smb ports = $DATANET_SMB_PORT
    disable netbios = yes
    server min protocol = SMB3
    # Encryption is chosen per share (lease shares set "smb encrypt = required"); a
    # global "desired" would break the guest session of the smoke share.
    server smb encrypt = if_required

    private dir = $SAMBA_DIR/private
    lock directory = $SAMBA_DIR/lock
    state directory = $SAMBA_DIR/state
    cache directory = $SAMBA_DIR/cache
    pid directory = $SAMBA_DIR/pid
    ncalrpc dir = $SAMBA_DIR/ncalrpc
    passdb backend = tdbsam:$SAMBA_DIR/private/passdb.tdb
    log file = $SAMBA_DIR/log/%m.log
    max log size = 10000
    log level = 1

    map to guest = Bad User
    guest account = nobody
    load printers = no
    printing = bsd
    printcap name = /dev/null
    disable spoolss = yes
    usershare max shares = 0

    registry shares = yes

[datanet-smoke]
    path = $SMOKE_SHARE_DIR
    read only = yes
    guest ok = yes
    guest only = yes
    browseable = yes
EOF
    mv -f "$SMB_CONF.tmp" "$SMB_CONF"
}

cmd_start() {
    require_root
    check_run_dir
    load_ports
    command -v smbd >/dev/null || die "smbd is not installed; run scripts/setup.sh"
    mkdir -p "$RUN"

    if smbd_pid >/dev/null; then
        info "smbd already running (pid $(smbd_pid))"
        return 0
    fi

    require_port_free "$DATANET_SMB_PORT" "Samba smbd" DATANET_SMB_PORT
    write_smb_conf
    info "starting smbd on 127.0.0.1:$DATANET_SMB_PORT"
    start_daemon smbd smbd --foreground --no-process-group --debug-stdout -s "$SMB_CONF"
    wait_for_port "$DATANET_SMB_PORT" "Samba smbd" smbd 60
    info "Samba ready: //127.0.0.1/datanet-smoke on port $DATANET_SMB_PORT, smb.conf $SMB_CONF"
}

cmd_stop() {
    check_run_dir
    stop_daemon smbd smbd "$SMB_CONF" 15
}

cmd_status() {
    check_run_dir
    load_ports
    local pid
    if pid=$(smbd_pid); then
        echo "smbd: running (pid $pid, port $DATANET_SMB_PORT)"
    else
        echo "smbd: stopped"
        return 3
    fi
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) die "usage: $0 start|stop|status" ;;
esac
