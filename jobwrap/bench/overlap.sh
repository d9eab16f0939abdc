#!/usr/bin/env bash
# Measures the wall time that overlapped staging saves on a busy cluster.
#
# For each mode, a filler job takes every CPU of cluster a for FILL_SECONDS. jobwrap
# then runs a job with one INPUT_MIB input object on the same cluster, and one second
# later a competing job that needs every CPU for COMPETE_SECONDS is submitted:
#   stage-first  stage in, then submit: the competitor is queued first and runs first
#   overlap      submit with a deferred begin time, stage in while the job queues,
#                then release it: the job keeps its place ahead of the competitor
# The figure is the wall time of the jobwrap command, from start to the job's end and
# stage-out, so the expected saving is about COMPETE_SECONDS.
#
# Usage (as root, with the stack up): source $RUN/env.sh; jobwrap/bench/overlap.sh
# Environment: INPUT_MIB (default 512), FILL_SECONDS (default 20), COMPETE_SECONDS
# (default 15), JOBWRAP (binary,
# default target/release/jobwrap). The input and result objects stay in the stack's
# buckets under the prefix jobwrap-overlap-PID/.
set -euo pipefail

: "${DATANET_CONFIG:?run scripts/stack.sh up and source \$RUN/env.sh}"
: "${DATANET_SLURM_CONF:?run scripts/stack.sh up and source \$RUN/env.sh}"
INPUT_MIB=${INPUT_MIB:-512}
FILL_SECONDS=${FILL_SECONDS:-20}
COMPETE_SECONDS=${COMPETE_SECONDS:-15}
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
JOBWRAP=${JOBWRAP:-$REPO_DIR/target/release/jobwrap}
[[ -x $JOBWRAP ]] || { echo "build jobwrap first: cargo build --release -p jobwrap" >&2; exit 1; }

work=$(mktemp -d /var/tmp/jobwrap-overlap.XXXXXX)
name="jobwrap-overlap-$$"
cleanup() {
    SLURM_CONF=$DATANET_SLURM_CONF scancel --name "$name" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# A configuration with only cluster a, a private ledger and a private scratch root.
mkdir -p "$work/state" "$work/scratch"
python3 - "$DATANET_CONFIG" "$work" >"$work/datanet.toml" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
work = sys.argv[2]
# Drop the [clusters.b] section: every line up to the next table header.
text = re.sub(r"^\[clusters\.b\]\n(?:(?!\[).*\n)*", "", text, flags=re.M)
text = re.sub(r'scratch_root = "[^"]*"', f'scratch_root = "{work}/scratch"', text)
text = re.sub(r'state_dir = "[^"]*jobwrap"', f'state_dir = "{work}/state"', text)
print(text)
EOF
grep -q "$work/state" "$work/datanet.toml" || { echo "could not set the ledger directory" >&2; exit 1; }

# The input object: a job copies random bytes into its working directory and jobwrap's
# stage-out uploads them, so the benchmark needs no other S3 client.
head -c $((INPUT_MIB << 20)) /dev/urandom >"$work/input.bin"
printf '#!/bin/bash\ncp "$1" input.bin\n' >"$work/seed.sh"
"$JOBWRAP" --config "$work/datanet.toml" sbatch -J "$name" --stage-out "input.bin=models:$name/input.bin" \
    "$work/seed.sh" "$work/input.bin" >/dev/null 2>&1
rm -f "$work/input.bin"

printf '#!/bin/bash\nls -l input.bin > seen.txt\n' >"$work/job.sh"
node_cpus=$(SLURM_CONF=$DATANET_SLURM_CONF sinfo -h -o %c | head -n 1)
for mode in stage-first overlap; do
    SLURM_CONF=$DATANET_SLURM_CONF sbatch --parsable -J "$name" -c "$node_cpus" -o /dev/null \
        --wrap "sleep $FILL_SECONDS" >/dev/null
    sleep 1
    flags=(--stage-in "models:$name/input.bin=input.bin" --stage-out "seen.txt=results:$name/$mode/")
    [[ $mode == stage-first ]] && flags+=(--stage-first)
    start=$(date +%s.%N)
    "$JOBWRAP" --config "$work/datanet.toml" sbatch -J "$name" "${flags[@]}" "$work/job.sh" >/dev/null 2>&1 &
    jobwrap_pid=$!
    sleep 1
    SLURM_CONF=$DATANET_SLURM_CONF sbatch --parsable -J "$name" -c "$node_cpus" -o /dev/null \
        --wrap "sleep $COMPETE_SECONDS" >/dev/null
    wait "$jobwrap_pid"
    end=$(date +%s.%N)
    printf '%-12s %6.1f s  (input %d MiB, filler %d s, competitor %d s)\n' "$mode" \
        "$(python3 -c "print($end - $start)")" "$INPUT_MIB" "$FILL_SECONDS" "$COMPETE_SECONDS"
    # Let the filler and the job leave the queue before the next mode.
    while [[ -n $(SLURM_CONF=$DATANET_SLURM_CONF squeue -h -t PD,R,CG --name "$name") ]]; do sleep 1; done
done
