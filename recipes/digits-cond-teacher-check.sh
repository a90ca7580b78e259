#!/usr/bin/env bash
# The shipped class-conditional digits teacher, checked the way a user asks it for one class: `o2m sample
# digits-cond-teacher --class 3 -n 200` (its defaults: DDIM 50, guidance 1) at sampling seeds 0..4, and every class
# balanced (-n 1000) at the same seeds, read by the digits classifier in one `o2m score` run (class accuracy; FID for
# the balanced rows). Writes runs/digits-cond-teacher-check/ (or $1); about 2 minutes on 2 CPU cores.
set -euo pipefail
O2M=${O2M:-o2m}
case "$O2M" in /*) ;; */*) O2M="$PWD/$O2M" ;; esac
MODEL=${O2M_MODEL:-digits-cond-teacher}
WORK=${1:-runs/digits-cond-teacher-check}
mkdir -p "$WORK"
cd "$WORK"
ROWS=()
for s in 0 1 2 3 4; do
  "$O2M" sample "$MODEL" --class 3 -n 200 --seed "$s" --no-png --force -o "class3-seed$s"
  "$O2M" sample "$MODEL" -n 1000 --seed "$s" --no-png --force -o "all-seed$s"
  ROWS+=("class3-seed$s" "all-seed$s")
done
"$O2M" score "${ROWS[@]}" --ref digits --throughput-repeats 1 --force -o scores
cat scores/report.md
