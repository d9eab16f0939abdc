# shellcheck shell=bash
# Removes what the flow created: the lease (if a failure left it), the objects of the
# flow's buckets, the mount, the buckets, the mountpoint directory (if the flow made
# it) and $WORK. Every part is tried even when an earlier one fails. Sourced by flow.sh.

garage_cli() {
    "$DATANET_GARAGE" -c "$DATANET_GARAGE_CONFIG" "$@"
}

unmount_datanet() {
    local mountpoint=$1 i
    fusermount3 -u "$mountpoint" || umount "$mountpoint" || return 1
    for ((i = 0; i < 50; i++)); do
        mountpoint -q "$mountpoint" || return 0
        sleep 0.2
    done
    echo "$mountpoint is still mounted 10 s after fusermount3 -u"
    return 1
}

# Tears down the flow whose files are in $WORK. MOUNTED_AT is where its configuration
# is mounted now (empty if nowhere); MOUNTPOINT is the directory that the flow recorded
# as its mountpoint, removed if the flow created it.
teardown_flow() {
    local mounted_at=$1 mountpoint=$2 failed=0 bucket space
    [[ -d $WORK ]] || return 0

    if [[ -s $NODE_DIR/token && -f $CONFIG ]] &&
        "$BIN_DIR/samba-provisioner" --config "$CONFIG" list --json 2>/dev/null | grep -q '"state": "active"'; then
        "$BIN_DIR/samba-provisioner" --config "$CONFIG" revoke <"$NODE_DIR/token" || failed=1
    fi

    if [[ -n $mounted_at ]] && mountpoint -q "$mounted_at"; then
        # Garage deletes only empty buckets: remove the flow's objects through the mount.
        for space in models results meshes; do
            find "$mounted_at/$space" -mindepth 1 -maxdepth 1 -exec rm -rf {} + || failed=1
        done
        unmount_datanet "$mounted_at" || failed=1
    fi

    for bucket in "$MODELS_BUCKET" "$RESULTS_BUCKET"; do
        if garage_cli bucket info "$bucket" >/dev/null 2>&1; then
            garage_cli bucket delete --yes "$bucket" || failed=1
        fi
    done

    if [[ -f $WORK/mountpoint-created && -n $mountpoint ]] && ! mountpoint -q "$mountpoint"; then
        rmdir "$mountpoint" || failed=1
    fi
    if ((failed == 0)); then
        rm -rf "$WORK"
    else
        echo "teardown incomplete; $WORK stays for the next run to finish it"
    fi
    return "$failed"
}

# Tears down this run. Only a mount that this run made is touched: $WORK/mounted is
# written after `datanet mount` succeeded.
teardown() {
    local mounted_at=
    [[ -f $WORK/mounted ]] && mounted_at=$(<"$WORK/mounted")
    teardown_flow "$mounted_at" "$MOUNTPOINT"
}

# A run with --keep (or one that could not finish its teardown) left $WORK. Its
# objects are removed through its own mount, mounted again if needed.
teardown_previous() {
    local recorded mounted_at=
    recorded=$(cat "$WORK/mountpoint" 2>/dev/null || true)
    if [[ -f $WORK/mounted ]] && mountpoint -q "$(<"$WORK/mounted")"; then
        mounted_at=$(<"$WORK/mounted")
    elif [[ -f $CONFIG ]]; then
        mounted_at=$WORK/cleanup-mount
        mkdir -p "$mounted_at"
        "$BIN_DIR/datanet" mount --config "$CONFIG" --log-file "$WORK/cleanup-mount.log" "$mounted_at"
        sleep 0.5
    fi
    teardown_flow "$mounted_at" "$recorded"
}
