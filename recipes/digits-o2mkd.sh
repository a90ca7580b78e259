#!/usr/bin/env bash
# O2MKD on the embedded default: the shipped digits teacher -> a ratio-0.3 template ->
# K=4 students (output KD, p_own 0.5, 400 steps, batch 64 per student) -> scored next to
# the teacher and the untrained template, same sampler (DDIM 50), seed and sample count.
# About 6 minutes on a 2-core CPU. Writes to runs/digits-o2mkd/ (or $1).
set -euo pipefail
O2M=${O2M:-o2m}
case "$O2M" in /*) ;; */*) O2M="$PWD/$O2M" ;; esac
WORK=${1:-runs/digits-o2mkd}
N=${O2M_N:-500}
mkdir -p "$WORK"
cd "$WORK"
set -x
$O2M prune digits-teacher --ratio 0.3 --students 4 --seed 0 -o template --force
$O2M distill template --mode o2mkd --students 4 --p-own 0.5 --kd output --alpha 1 \
  --steps 400 --batch-size 64 --lr 5e-4 --seed 0 -o students --force
$O2M sample digits-teacher -n "$N" --scheduler ddim --steps 50 --seed 0 --no-png -o samples-teacher --force
$O2M sample template -n "$N" --scheduler ddim --steps 50 --seed 0 --no-png -o samples-template --force
$O2M sample students -n "$N" --scheduler ddim --steps 50 --seed 0 --no-png -o samples-students --force
$O2M score samples-teacher samples-template samples-students --ref digits -o scores --force
{ set +x; } 2>/dev/null
echo "report: $PWD/scores/report.md   loss curves: $PWD/students/loss.png"
