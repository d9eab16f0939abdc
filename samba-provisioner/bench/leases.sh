#!/usr/bin/env bash
# Benchmark of samba-provisioner against the stack's smbd.
#
#   samba-provisioner/bench/leases.sh [ROUNDS] [LIVE]
#
# 1. ROUNDS (default 20) sequential grant + revoke pairs: prints the median and the
#    maximum wall time of each command (target: under 0.5 s each).
# 2. LIVE (default 200; 0 skips this part) leases granted 8 at a time and held at
#    once; one login through smbclient checks that the last one works; then all are
#    revoked.
#
# Needs the stack (scripts/stack.sh up; source $RUN/env.sh) and a release build:
#   cargo build --release -p samba-provisioner
# Uses its own account prefix, state directory and allowed root, and removes them.
set -euo pipefail

ROUNDS=${1:-20}
LIVE=${2:-200}
: "${DATANET_CONFIG:?run scripts/stack.sh up and source \$RUN/env.sh}"
: "${DATANET_SMB_CONF:?run scripts/stack.sh up and source \$RUN/env.sh}"
: "${DATANET_SMB_PORT:?run scripts/stack.sh up and source \$RUN/env.sh}"
: "${DATANET_RUN_DIR:?run scripts/stack.sh up and source \$RUN/env.sh}"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${SAMBA_PROVISIONER_BIN:-$REPO/target/release/samba-provisioner}
[[ -x $BIN ]] || { echo "missing $BIN: run cargo build --release -p samba-provisioner" >&2; exit 1; }

WORK=$DATANET_RUN_DIR/samba-provisioner-bench
PREFIX=bench
mkdir -p "$WORK/root/dir"
chown daemon:daemon "$WORK/root/dir"
key_file=$(sed -n 's/^token_key_file = "\(.*\)"$/\1/p' "$DATANET_CONFIG")
cat >"$WORK/datanet.toml" <<TOML
[samba]
server = "127.0.0.1"
port = $DATANET_SMB_PORT
smb_conf = "$DATANET_SMB_CONF"
allowed_roots = ["$WORK/root"]
state_dir = "$WORK/state"
token_key_file = "$key_file"
force_user = "daemon"
force_group = "daemon"
account_prefix = "$PREFIX"
TOML
sp() { "$BIN" --config "$WORK/datanet.toml" "$@"; }

cleanup() {
    sp gc >/dev/null 2>&1 || true
    sp list --json 2>/dev/null | grep -o '"id": "[a-z0-9]*"' | cut -d'"' -f4 |
        xargs -r -n1 -P8 "$BIN" --config "$WORK/datanet.toml" revoke >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

now_ms() { date +%s%3N; }
median_max() { sort -n | awk '{a[NR]=$1} END {printf "median %d ms, max %d ms\n", a[int((NR+1)/2)], a[NR]}'; }

grant_ms=() revoke_ms=()
for ((i = 0; i < ROUNDS; i++)); do
    start=$(now_ms)
    id=$(sp grant --path "$WORK/root/dir" --ttl 10m --json | grep -o '"id": "[a-z0-9]*"' | cut -d'"' -f4)
    middle=$(now_ms)
    sp revoke "$id" >/dev/null
    end=$(now_ms)
    grant_ms+=($((middle - start)))
    revoke_ms+=($((end - middle)))
done
echo "grant  ($ROUNDS rounds): $(printf '%s\n' "${grant_ms[@]}" | median_max)"
echo "revoke ($ROUNDS rounds): $(printf '%s\n' "${revoke_ms[@]}" | median_max)"

((LIVE > 0)) || exit 0
start=$(now_ms)
seq "$LIVE" | xargs -P8 -I{} "$BIN" --config "$WORK/datanet.toml" grant --path "$WORK/root/dir" --ttl 10m >"$WORK/tokens"
end=$(now_ms)
live=$(sp list --json | grep -c '"id"')
echo "granted $live live leases in $((end - start)) ms"

last=$(tail -n1 "$WORK/tokens")
sp decode --format json <<<"$last" | sed -n 's/.*"\(account\|password\)": "\(.*\)".*/\1 \2/p' |
    awk '$1 == "account" {print "username=" $2} $1 == "password" {print "password=" $2}' >"$WORK/auth"
chmod 600 "$WORK/auth"
share=$(sed -n 's/^username=//p' "$WORK/auth")
smbclient -s "$DATANET_SMB_CONF" "//127.0.0.1/$share" -p "$DATANET_SMB_PORT" -m SMB3 \
    --client-protection=encrypt -A "$WORK/auth" -c ls >/dev/null
echo "login to lease $live of $live: ok"

start=$(now_ms)
sp list --json | grep -o '"id": "[a-z0-9]*"' | cut -d'"' -f4 |
    xargs -n1 -P8 "$BIN" --config "$WORK/datanet.toml" revoke >/dev/null
end=$(now_ms)
echo "revoked $live leases in $((end - start)) ms"
