#!/bin/bash
# Batch script of the demo flow: solves one CalculiX deck with ccx.
#   jobwrap sbatch --stage-in models:ccx/DECK/DECK.inp ... ccx-job.sh DECK
# ccx reports input errors on standard output and still exits with 0, so the script
# also fails when the output has an "*ERROR" line.
#SBATCH --time=00:05:00
#SBATCH --ntasks=1
set -u
deck=$1

ccx -i "$deck" >"$deck.log" 2>&1
status=$?
cat "$deck.log"

if ((status != 0)) || grep -q '^ *\*ERROR' "$deck.log"; then
    echo "ccx failed on $deck (exit code $status); see $deck.log" >&2
    exit 1
fi
