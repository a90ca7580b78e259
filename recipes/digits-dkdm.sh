#!/usr/bin/env bash
# DKDM on the embedded default: the shipped digits teacher distilled with no data at all, scored
# next to the data-based O2OKD student of the same template, budget and seed.
#   1. template: ratio-0.3 prune of the shipped teacher;
#   2. O2OKD (data-based, K=1) and DKDM (data-free, K=1, rho 0.4, buffer built by 10-step DDIM
#      jumps): 400 steps, batch 64, lr 5e-4 each;
#   3. the buffer-initialization question (beyond the paper): two DKDM runs on a smaller buffer
#      (rho 0.05: 3200 slots) that differ only in how it is built, exact shuffle denoise
#      (about 1.6M teacher sample-forwards) against --init-steps 10 (32K);
#   4. every model sampled with DDIM 50 steps, seed 0, $O2M_N images, and scored in one table.
# About 15 minutes on a 2-core CPU (the exact buffer build is half of it). Writes to runs/digits-dkdm/ (or $1).
set -euo pipefail
O2M=${O2M:-o2m}
case "$O2M" in /*) ;; */*) O2M="$PWD/$O2M" ;; esac
WORK=${1:-runs/digits-dkdm}
N=${O2M_N:-500}
TRAIN="--steps 400 --batch-size 64 --lr 5e-4 --seed 0 --force"
mkdir -p "$WORK"
cd "$WORK"
set -x
$O2M prune digits-teacher --ratio 0.3 --seed 0 --no-throughput -o template --force
$O2M distill template --mode o2mkd --students 1 --data digits $TRAIN -o o2okd
$O2M distill template --mode dkdm --students 1 --rho 0.4 --init-steps 10 $TRAIN -o dkdm
$O2M distill template --mode dkdm --students 1 --rho 0.05 --init-steps 10 $TRAIN -o dkdm-small-ddim
$O2M distill template --mode dkdm --students 1 --rho 0.05 $TRAIN -o dkdm-small-exact
for m in o2okd dkdm dkdm-small-ddim dkdm-small-exact; do
  $O2M sample "$m" -n "$N" --scheduler ddim --steps 50 --seed 0 --no-png -o "samples-$m" --force
done
$O2M sample digits-teacher -n "$N" --scheduler ddim --steps 50 --seed 0 --no-png -o samples-teacher --force
$O2M score samples-teacher samples-o2okd samples-dkdm samples-dkdm-small-ddim samples-dkdm-small-exact \
  --ref digits -o scores --force
{ set +x; } 2>/dev/null
for m in dkdm dkdm-small-ddim dkdm-small-exact; do
  python3 -c "import json,sys; b=json.load(open('$m/manifest.json'))['summary']['buffer']; print('$m buffer:', b['slots'], 'slots,', b['teacher_forwards'], 'teacher forwards,', b['seconds'], 's')"
done
echo "report: $PWD/scores/report.md"
