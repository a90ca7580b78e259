#!/usr/bin/env bash
# The whole chain in about a minute on a CPU, exactly as a user types it (CI runs it through
# tests/test_recipes.py): shipped digits teacher -> prune -> O2MKD (K=2) -> merge -> DKDM ->
# sample every model -> one score table with the FID-vs-MACs plot. Tiny budgets: this checks
# that the stages chain, not what they achieve. Writes to runs/smoke/ (or $1).
set -euo pipefail
O2M=${O2M:-o2m}
case "$O2M" in /*) ;; */*) O2M="$PWD/$O2M" ;; esac
WORK=${1:-runs/smoke}
mkdir -p "$WORK"
cd "$WORK"
set -x
$O2M prune digits-teacher --ratio 0.5 --students 2 --no-throughput -o template --force
$O2M distill template --mode o2mkd -k 2 --steps 10 --batch-size 16 --log-every 5 --save-every 5 -o students --force
$O2M merge students -o merged.safetensors --force
$O2M distill template --mode dkdm -k 1 --rho 0.01 --init-steps 2 --steps 10 --batch-size 16 --log-every 5 \
  -o dkdm --force
for m in template students merged.safetensors dkdm; do
  $O2M sample "$m" -n 64 --scheduler ddim --steps 10 --seed 0 --no-png -o "samples-${m%.safetensors}" --force
done
$O2M score samples-template samples-students samples-merged samples-dkdm --ref digits --throughput-batch 16 \
  -o scores --force
{ set +x; } 2>/dev/null
echo "report: $PWD/scores/report.md"
