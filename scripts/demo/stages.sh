# shellcheck shell=bash
# The stages of the flow. Each runs as a step (runner.sh) with errexit, writes its
# commands' output to the log and adds its numbers to the summary with `count`.
# Sourced by flow.sh.

samba_provisioner() {
    "$BIN_DIR/samba-provisioner" --config "$CONFIG" "$@"
}

# ---------------------------------------------------------------------------
# Set-up

configure() {
    mkdir -p "$WORK"
    chmod 700 "$WORK"
    mkdir -p "$WORK/cache" "$WORK/jobwrap" "$WORK/samba-provisioner" "$JOBS_DIR" "$NODE_DIR" "$MESHES_DIR"
    echo "$MOUNTPOINT" >"$WORK/mountpoint"
    if [[ ! -e $MOUNTPOINT ]]; then
        mkdir -p "$MOUNTPOINT"
        touch "$WORK/mountpoint-created"
    fi

    bash "$REPO_DIR/scripts/garage.sh" bucket "$MODELS_BUCKET"
    bash "$REPO_DIR/scripts/garage.sh" bucket "$RESULTS_BUCKET"
    write_config
    cat "$CONFIG"
    "$BIN_DIR/datanet" check --config "$CONFIG"
}

# Two backends: models and results are Garage buckets, meshes is a local directory.
# File access on the SMB share runs as root (force user), because root owns the files
# that the mount shows. A site would use a service account that owns its spaces.
write_config() {
    local space bucket
    {
        echo "# The demo flow's configuration, written by scripts/demo/flow.sh."
        for space in models results; do
            bucket=$MODELS_BUCKET
            [[ $space == results ]] && bucket=$RESULTS_BUCKET
            cat <<EOF

[spaces.$space]
url = "s3://$bucket"
endpoint = "$DATANET_S3_ENDPOINT"
region = "$DATANET_S3_REGION"
access_key_id = "$DATANET_S3_ACCESS_KEY_ID"
secret_access_key_file = "$DATANET_S3_SECRET_FILE"
EOF
        done
        cat <<EOF

[spaces.meshes]
url = "file://$MESHES_DIR"

[cache]
dir = "$WORK/cache"

[clusters.a]
slurm_conf = "$DATANET_SLURM_CONF"
scratch_root = "$DATANET_SCRATCH_ROOT"
near_spaces = ["models", "results"]

[jobwrap]
state_dir = "$WORK/jobwrap"
poll_interval = "1s"

[samba]
server = "127.0.0.1"
port = $DATANET_SMB_PORT
smb_conf = "$DATANET_SMB_CONF"
allowed_roots = ["$MOUNTPOINT/results"]
state_dir = "$WORK/samba-provisioner"
token_key_file = "$DATANET_SAMBA_TOKEN_KEY_FILE"
force_user = "root"
encrypt = "required"
max_ttl = "1h"
EOF
    } >"$CONFIG.tmp"
    mv -f "$CONFIG.tmp" "$CONFIG"
}

mount_datanet() {
    local i
    "$BIN_DIR/datanet" mount --config "$CONFIG" -o allow_other --log-file "$WORK/mount.log" "$MOUNTPOINT"
    for ((i = 0; i < 50; i++)); do
        mountpoint -q "$MOUNTPOINT" && break
        sleep 0.2
    done
    mountpoint -q "$MOUNTPOINT" || fail "nothing is mounted on $MOUNTPOINT 10 s after datanet mount; see $WORK/mount.log"
    echo "$MOUNTPOINT" >"$WORK/mounted"
    ls -la "$MOUNTPOINT"
    [[ -d $MOUNTPOINT/models && -d $MOUNTPOINT/results && -d $MOUNTPOINT/meshes ]] ||
        fail "$MOUNTPOINT does not show the spaces models, results and meshes"
}

# ---------------------------------------------------------------------------
# Upload: plain cp through the mount, and zcat for decks that the package gzipped.

# Prints the package file for NAME (the plain one, else NAME.gz).
package_file() {
    local name=$1
    if [[ -f $name ]]; then
        echo "$name"
    elif [[ -f $name.gz ]]; then
        echo "$name.gz"
    else
        fail "neither $name nor $name.gz exists; reinstall calculix-ccx-test and gmsh-doc"
    fi
}

# Copies SOURCE (decompressing a .gz) to DEST inside the mount.
upload() {
    local source=$1 dest=$2
    mkdir -p "$(dirname "$dest")"
    if [[ $source == *.gz ]]; then
        echo "zcat $source > $dest"
        zcat "$source" >"$dest"
    else
        echo "cp $source $dest"
        cp "$source" "$dest"
    fi
    count uploaded_files 1
    count uploaded_bytes "$(stat -c %s "$dest")"
    printf '%s\t%s\n' "$source" "${dest#"$MOUNTPOINT/models/"}" >>"$WORK/uploads.tsv"
}

upload_models() {
    local deck source
    : >"$WORK/uploads.tsv"
    for deck in "${DECKS[@]}"; do
        source=$(package_file "$CCX_TESTS/$deck.inp")
        upload "$source" "$MOUNTPOINT/models/ccx/$deck/$deck.inp"
    done

    # A deck with a user's mistake: it includes a mesh file that was never uploaded.
    mkdir -p "$MOUNTPOINT/models/ccx/$FAILING_DECK"
    printf '%s\n' '*HEADING' 'Deck whose mesh file was never uploaded' \
        '*INCLUDE, INPUT=missing-mesh.inp' '*STEP' '*STATIC' '*END STEP' \
        >"$MOUNTPOINT/models/ccx/$FAILING_DECK/$FAILING_DECK.inp"

    source=$(package_file "$GMSH_DEMOS/$MESH_GEOMETRY.geo")
    upload "$source" "$MOUNTPOINT/models/geometry/$MESH_GEOMETRY.geo"
}

# Every uploaded file reads back identical through the mount, and its object in the
# models bucket has the same size.
check_uploads() {
    local source key local_size store_size
    while IFS=$'\t' read -r source key; do
        if [[ $source == *.gz ]]; then
            zcat "$source" | cmp - "$MOUNTPOINT/models/$key" || fail "$MOUNTPOINT/models/$key differs from $source"
        else
            cmp "$source" "$MOUNTPOINT/models/$key" || fail "$MOUNTPOINT/models/$key differs from $source"
        fi
        local_size=$(stat -c %s "$MOUNTPOINT/models/$key")
        store_size=$(s3_size "$MODELS_BUCKET" "$key") || fail "s3://$MODELS_BUCKET/$key is missing"
        [[ $store_size == "$local_size" ]] ||
            fail "s3://$MODELS_BUCKET/$key has $store_size bytes, the mount shows $local_size"
        echo "s3://$MODELS_BUCKET/$key: $store_size bytes, same as through the mount"
    done <"$WORK/uploads.tsv"
}

# ---------------------------------------------------------------------------
# Jobs

# Runs `jobwrap sbatch ARGS...` in the jobs directory as job LABEL, expects exit code
# EXPECTED, and adds the job's staged bytes from its ledger record to the summary.
run_job() {
    local label=$1 expected=$2 rc=0 id
    shift 2
    (cd "$JOBS_DIR" && "$BIN_DIR/jobwrap" --config "$CONFIG" sbatch "$@") >"$JOBS_DIR/$label.out" 2>&1 || rc=$?
    cat "$JOBS_DIR/$label.out"
    count jobs 1

    id=$(sed -n 's/^jobwrap: job \([^ :]*\) created$/\1/p' "$JOBS_DIR/$label.out" | head -n 1)
    [[ -n $id ]] || fail "jobwrap printed no job id for $label (exit code $rc)"
    "$BIN_DIR/jobwrap" --config "$CONFIG" status --json "$id" >"$JOBS_DIR/$label.json"
    python3 - "$JOBS_DIR/$label.json" >>"$STATS" <<'EOF'
import json, sys
record = json.load(open(sys.argv[1]))
inputs, outputs = record.get("inputs", []), record.get("outputs", [])
print("staged_in_files", len(inputs))
print("staged_in_bytes", sum(i.get("size_bytes", 0) for i in inputs))
print("staged_out_files", len(outputs))
print("staged_out_bytes", sum(o.get("size_bytes", 0) for o in outputs))
EOF
    JOB_STATE=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["state"])' "$JOBS_DIR/$label.json")
    echo "job $label: jobwrap id $id, exit code $rc, state $JOB_STATE"
    ((rc == expected)) || fail "jobwrap sbatch for $label exited with $rc, expected $expected"
}

mesh_geometry() {
    local mesh=$MOUNTPOINT/meshes/$MESH_GEOMETRY/$MESH_GEOMETRY.inp
    cp "$FLOW_DIR/gmsh-job.sh" "$JOBS_DIR/"
    run_job "mesh-$MESH_GEOMETRY" 0 --job-name "flow-$NAME-gmsh" gmsh-job.sh
    [[ $JOB_STATE == completed ]] || fail "the gmsh job ended in state $JOB_STATE"
    count completed 1

    grep -q '^\*NODE' "$mesh" || fail "$mesh has no *NODE section"
    grep -q '^\*ELEMENT' "$mesh" || fail "$mesh has no *ELEMENT section"
    cmp "$mesh" "$MESHES_DIR/$MESH_GEOMETRY/$MESH_GEOMETRY.inp" ||
        fail "the mesh in the mount differs from the one in the meshes directory"
    echo "$mesh: $(grep -c '^[0-9]' "$mesh") node and element lines"
}

# Solves DECK: its .inp is staged in from models, its results staged out to results.
ccx_job() {
    local deck=$1 expected=$2
    cp "$FLOW_DIR/ccx-job.sh" "$JOBS_DIR/"
    run_job "ccx-$deck" "$expected" \
        --stage-in "models:ccx/$deck/$deck.inp" \
        --stage-out "$deck.dat" --stage-out "$deck.frd" --stage-out "$deck.sta" --stage-out "$deck.log" \
        --output "results:ccx/$deck/" \
        --job-name "flow-$NAME-$deck" ccx-job.sh "$deck"
}

solve_deck() {
    local deck=$1 dir=$MOUNTPOINT/results/ccx/$1
    ccx_job "$deck" 0
    [[ $JOB_STATE == completed ]] || fail "the ccx job for $deck ended in state $JOB_STATE"
    count completed 1
    ls -la "$dir"
    [[ -s $dir/$deck.dat ]] || fail "$dir/$deck.dat is missing or empty"
    [[ -s $dir/$deck.frd ]] || fail "$dir/$deck.frd is missing or empty"
    compgen -G "$dir/slurm-*.out" >/dev/null || fail "no Slurm log slurm-*.out in $dir"
}

compare_dat() {
    local deck=$1 reference
    reference=$(package_file "$CCX_TESTS/$deck.dat.ref")
    python3 "$FLOW_DIR/datcmp.py" "$MOUNTPOINT/results/ccx/$deck/$deck.dat" "$reference"
    count dat_verified 1
}

failing_job() {
    local dir=$MOUNTPOINT/results/ccx/$FAILING_DECK log
    ccx_job "$FAILING_DECK" 1
    [[ $JOB_STATE == failed ]] || fail "the failing job ended in state $JOB_STATE, expected failed"
    ls -la "$dir"
    log=$(compgen -G "$dir/slurm-*.out" | head -n 1) || fail "no Slurm log slurm-*.out in $dir"
    grep -F '*ERROR' "$log" || fail "$log does not show ccx's *ERROR line"
    grep -F "ccx failed on $FAILING_DECK" "$log" || fail "$log does not show the script's failure message"
    [[ -s $dir/$FAILING_DECK.log ]] || fail "$dir/$FAILING_DECK.log is missing"
    count failed_as_intended 1
}

# ---------------------------------------------------------------------------
# Viewing results over SMB: the provisioner side grants and revokes; the graphical
# node side has only the token file and the token key.

grant_share() {
    (
        umask 077
        samba_provisioner grant --path "$MOUNTPOINT/results/ccx" --ttl 30m --label "flow-$NAME" \
            >"$NODE_DIR/token"
    )
    [[ -s $NODE_DIR/token ]] || fail "samba-provisioner grant printed no token"
    echo "token written to $NODE_DIR/token (mode $(stat -c %a "$NODE_DIR/token"))"
    samba_provisioner list
}

# Decodes the token without the site's configuration and writes an smbclient
# authentication file (mode 0600) and the share's public settings.
decode_token() {
    (
        umask 077
        env -u DATANET_CONFIG "$BIN_DIR/samba-provisioner" decode \
            --key-file "$DATANET_SAMBA_TOKEN_KEY_FILE" --format json "$NODE_DIR/token" |
            python3 -c '
import json, sys
info = json.load(sys.stdin)
node_dir = sys.argv[1]
with open(node_dir + "/smb-auth", "w") as auth:
    auth.write("username = %s\npassword = %s\n" % (info["account"], info["password"]))
with open(node_dir + "/share.env", "w") as share:
    for key in ("server", "port", "share", "encrypt", "expires"):
        share.write("SMB_%s=%s\n" % (key.upper(), info[key]))
' "$NODE_DIR"
    )
    cat "$NODE_DIR/share.env"
    # shellcheck source=/dev/null
    source "$NODE_DIR/share.env"
    [[ $SMB_SERVER == 127.0.0.1 && $SMB_PORT == "$DATANET_SMB_PORT" ]] ||
        fail "the token names $SMB_SERVER:$SMB_PORT, expected 127.0.0.1:$DATANET_SMB_PORT"
    [[ $SMB_ENCRYPT == required ]] || fail "the token says encrypt=$SMB_ENCRYPT, the configuration requires encryption"
}

# Runs smbclient COMMANDS on the lease's share with the node's credentials.
smb() {
    # shellcheck source=/dev/null
    source "$NODE_DIR/share.env"
    local protection=()
    [[ $SMB_ENCRYPT == off ]] || protection=(--client-protection=encrypt)
    smbclient "//$SMB_SERVER/$SMB_SHARE" -p "$SMB_PORT" -m SMB3 "${protection[@]}" \
        -A "$NODE_DIR/smb-auth" -c "$1"
}

use_share() {
    local deck=${DECKS[0]}
    printf 'Viewed %s on a graphical node of flow %s at %s\n' "$deck.frd" "$NAME" "$(date -u +%FT%TZ)" \
        >"$NODE_DIR/note.txt"
    smb "get $deck/$deck.frd $NODE_DIR/$deck.frd; put $NODE_DIR/note.txt viewer-note.txt"
    cmp "$NODE_DIR/$deck.frd" "$MOUNTPOINT/results/ccx/$deck/$deck.frd" ||
        fail "$deck.frd downloaded over SMB differs from the one in the mount"
    count smb_downloads 1
    count smb_uploads 1
}

check_note() {
    local i
    cmp "$NODE_DIR/note.txt" "$MOUNTPOINT/results/ccx/viewer-note.txt" ||
        fail "$MOUNTPOINT/results/ccx/viewer-note.txt differs from the note uploaded over SMB"
    # The mount uploads a file when it is closed; allow the upload a few seconds.
    for ((i = 0; i < 20; i++)); do
        if s3_get "$RESULTS_BUCKET" ccx/viewer-note.txt "$NODE_DIR/note-from-store.txt" 2>/dev/null &&
            cmp -s "$NODE_DIR/note.txt" "$NODE_DIR/note-from-store.txt"; then
            echo "s3://$RESULTS_BUCKET/ccx/viewer-note.txt holds the note"
            return 0
        fi
        sleep 0.5
    done
    fail "s3://$RESULTS_BUCKET/ccx/viewer-note.txt is missing or differs from the note after 10 s"
}

revoke_share() {
    local output rc=0
    samba_provisioner revoke <"$NODE_DIR/token"
    output=$(smb "ls" 2>&1) || rc=$?
    echo "$output"
    ((rc != 0)) || fail "smbclient still lists the share after the lease was revoked"
    grep -Eq 'NT_STATUS_(LOGON_FAILURE|ACCESS_DENIED|BAD_NETWORK_NAME|ACCOUNT_DISABLED)' <<<"$output" ||
        fail "smbclient failed without a logon or share error after the revoke"
    count smb_rejected 1
}
