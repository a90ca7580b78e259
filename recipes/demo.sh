#!/usr/bin/env bash
# The main job on the embedded default, in a few minutes on a 2-core CPU: the shipped digits teacher ->
# prune (ratio 0.3) -> a short O2MKD run (K=4 students) -> sample teacher and students -> score both,
# ending with the table teacher vs students (params, MACs, img/s, FID) and both sample grids side by side.
# Runs in runs/demo/ (or $O2M_DEMO_DIR). O2M_DEMO_STEPS / O2M_DEMO_N shrink it (the tests use that).
set -euo pipefail
O2M=${O2M:-o2m}
case "$O2M" in /*) ;; */*) O2M="$PWD/$O2M" ;; esac
WORK=${O2M_DEMO_DIR:-runs/demo}
STEPS=${O2M_DEMO_STEPS:-200}
N=${O2M_DEMO_N:-500}
mkdir -p "$WORK"
cd "$WORK"
set -x
$O2M info digits-teacher
$O2M prune digits-teacher --ratio 0.3 --students 4 --no-throughput -o template --force
$O2M distill template --mode o2mkd -k 4 --p-own 0.5 --steps "$STEPS" --batch-size 64 --lr 1e-3 --lr-warmup 20 \
  --seed 0 --save-every 1000000 -o students --force
$O2M sample digits-teacher --scheduler ddim --steps 25 -n "$N" --seed 0 -o samples-teacher --force
$O2M sample students --scheduler ddim --steps 25 -n "$N" --seed 0 -o samples-students --force
$O2M score samples-teacher samples-students --ref digits --throughput-repeats 1 -o scores --force
{ set +x; } 2>/dev/null
echo
sed -n '/^| /p' scores/report.md
echo
echo "teacher vs K=4 students, sample grids side by side: $PWD/scores/grids.png"
echo "full report: $PWD/scores/report.md"
