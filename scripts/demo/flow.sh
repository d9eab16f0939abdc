#!/usr/bin/env bash
# The CAE flow across the data network, on the running service stack (scripts/stack.sh
# up, then source $RUN/env.sh). It prints one line per step with its time and ends
# with a summary table. It exits non-zero if any step or check failed.
#
#   scripts/demo/flow.sh [--mountpoint PATH] [--name NAME] [--log FILE] [--keep]
#
#   --mountpoint PATH  where datanet is mounted (default /datanet); it must be an empty
#                      directory or not exist
#   --name NAME        names this run's buckets (datanet-NAME-models, -results) and its
#                      directory $RUN/flows/NAME (default demo; lowercase letters,
#                      digits and '-', at most 40 characters)
#   --log FILE         the output of every command (default: a new file in /tmp)
#   --keep             leave the mount, buckets and files in place afterwards
#
# Steps: write a configuration with the spaces models and results (two Garage buckets)
# and meshes (a local directory), mount it, copy CalculiX decks from calculix-ccx-test
# into models through the mount, mesh a gmsh demo geometry with `jobwrap sbatch`
# (models -> meshes), solve each deck with ccx through `jobwrap sbatch` (models ->
# results), compare every .dat with its .dat.ref (datcmp.py), run one failing job,
# then share the results with `samba-provisioner grant`, use the share with smbclient
# as a graphical node would, revoke it, and tear down.
#
# Binaries come from DATANET_BIN_DIR (default: target/debug of this repository).
set -euo pipefail

FLOW_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$FLOW_DIR/../.." && pwd)
BIN_DIR=${DATANET_BIN_DIR:-${CARGO_TARGET_DIR:-$REPO_DIR/target}/debug}

CCX_TESTS=/usr/share/doc/calculix-ccx-test/examples/test
GMSH_DEMOS=/usr/share/doc/gmsh-doc/doc/gmsh/demos/simple_geo

# Decks that ccx 2.20 (Debian 12) solves in about 0.1 s each on 2 cores, and whose .dat
# matches the reference within the tolerance of CalculiX's own datcheck.pl. The input of
# each deck except achtel2 is gzipped in the package.
DECKS=(achtel2 beam8p aniso ax6)
FAILING_DECK=broken
MESH_GEOMETRY=cone

die() {
    printf 'flow: error: %s\n' "$*" >&2
    exit 2
}

MOUNTPOINT=/datanet
NAME=demo
LOG=
KEEP=0
while (($# > 0)); do
    case $1 in
        --mountpoint) (($# >= 2)) || die "--mountpoint needs a PATH"; MOUNTPOINT=$2; shift ;;
        --mountpoint=*) MOUNTPOINT=${1#*=} ;;
        --name) (($# >= 2)) || die "--name needs a NAME"; NAME=$2; shift ;;
        --name=*) NAME=${1#*=} ;;
        --log) (($# >= 2)) || die "--log needs a FILE"; LOG=$2; shift ;;
        --log=*) LOG=${1#*=} ;;
        --keep) KEEP=1 ;;
        *) die "unknown argument \"$1\"; usage: $0 [--mountpoint PATH] [--name NAME] [--log FILE] [--keep]" ;;
    esac
    shift
done

source "$FLOW_DIR/preflight.sh"

check_arguments
check_stack
check_tools

WORK=$DATANET_RUN_DIR/flows/$NAME
CONFIG=$WORK/datanet.toml
MODELS_BUCKET=datanet-$NAME-models
RESULTS_BUCKET=datanet-$NAME-results
MESHES_DIR=$WORK/spaces/meshes
JOBS_DIR=$WORK/jobs
NODE_DIR=$WORK/node
[[ -n $LOG ]] || LOG=$(mktemp "/tmp/datanet-flow-$NAME.XXXXXX.log")
touch "$LOG" 2>/dev/null || die "the log file --log $LOG is not writable; give a writable path"

source "$FLOW_DIR/runner.sh"
source "$FLOW_DIR/s3.sh"
source "$FLOW_DIR/stages.sh"
source "$FLOW_DIR/teardown.sh"

trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

if [[ -e $WORK ]]; then
    step "remove the kept run $NAME" teardown_previous
fi
check_mountpoint_free
step "configure models, results (Garage), meshes (dir)" configure
step "mount datanet at $MOUNTPOINT" mount_datanet
step "upload ${#DECKS[@]} CalculiX decks and $MESH_GEOMETRY.geo via cp" upload_models
check "check the uploads in the mount and the store" check_uploads
check "mesh $MESH_GEOMETRY.geo with gmsh (models -> meshes)" mesh_geometry
for deck in "${DECKS[@]}"; do
    check "solve $deck with ccx (models -> results)" solve_deck "$deck"
    check "compare $deck.dat with $deck.dat.ref" compare_dat "$deck"
done
check "failing job $FAILING_DECK: logs reach results" failing_job
step "grant an SMB share on $MOUNTPOINT/results/ccx" grant_share
check "decode the token as a graphical node" decode_token
check "download ${DECKS[0]}.frd, upload a note (SMB3)" use_share
check "find the note in the mount and the store" check_note
check "revoke; the share rejects the credentials" revoke_share
