#!/usr/bin/env bash
# The main job on the embedded default: the shipped digits teacher -> prune (report) -> sample -> score.
# Runs in runs/demo/ (or $O2M_DEMO_DIR); about 1-2 minutes on a 2-core CPU after install.
set -euo pipefail
O2M=${O2M:-o2m}
case "$O2M" in /*) ;; */*) O2M="$PWD/$O2M" ;; esac
WORK=${O2M_DEMO_DIR:-runs/demo}
mkdir -p "$WORK"
cd "$WORK"
set -x
$O2M info digits-teacher
$O2M prune digits-teacher --ratio 0.3 --students 4 -o template --force
$O2M sample digits-teacher --scheduler ddim --steps 50 -n 1000 --seed 0 -o samples --force
$O2M score samples --ref digits -o scores --force
{ set +x; } 2>/dev/null
echo
echo "samples: $PWD/samples/grid.png   report: $PWD/scores/report.md"
