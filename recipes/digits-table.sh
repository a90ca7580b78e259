#!/usr/bin/env bash
# The comparison of the O2MKD paper's Table 1, reproduced on the embedded default (the shipped
# digits teacher and the bundled digits), for two templates (prune ratios 0.3 and 0.5):
#   no KD           plain training of the template on the data (--kd none: the teacher never runs)
#   O2OKD           one student on all timesteps, output KD on the data
#   O2OKD 4x        the same with 4x the steps: a K=4 run's total compute in one student
#   O2MKD K=4       four students, one per quarter of [0, 1000), p_own 0.5
#   O2MKD merged    the four students task-arithmetic merged (lambda 1/4: their average)
#   DKDM            one student, data-free (dynamic buffer, rho 0.2, built by 10-step DDIM jumps;
#                   the paper's rho 0.4 doubles the build time; the README's Results compares the two)
#   DF-O2MKD K=4    four students, data-free (DKDM's buffer x O2MKD's plan), and its merge
# Budgets (the same for every trained row): 400 steps x batch 64 per student, lr 5e-4, EMA 0.999,
# seed 0. Every model is sampled with DDIM 50 steps, seed 0, $O2M_N images (default 1000) (the teacher
# also with seed 1, to show how much FID moves with the sampling seed alone), and
# scored in one `o2m score` run (digits-classifier FID/KID against the 1797 digits; throughput
# measured in that run). About 50 minutes on a 2-core CPU. Writes runs/digits-table/ (or $1),
# and docs/results.md + docs/results-fid-vs-macs.png (or $O2M_DOCS/...).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
O2M=${O2M:-o2m}
case "$O2M" in /*) ;; */*) O2M="$PWD/$O2M" ;; esac
# The report writer runs on the Python that runs o2m (the venv's, under `make table`).
PY=${O2M_PYTHON:-$(dirname "$(command -v "$O2M")")/python}
[ -x "$PY" ] || PY=python3
DOCS=${O2M_DOCS:-$HERE/../docs}
case "$DOCS" in /*) ;; *) DOCS="$PWD/$DOCS" ;; esac
WORK=${1:-runs/digits-table}
N=${O2M_N:-1000}
STEPS=${O2M_STEPS:-400}
RHO=${O2M_RHO:-0.2}  # (O2M_STEPS, O2M_RHO, O2M_N: smaller budgets for a quick check of the recipe itself)
TRAIN="--steps $STEPS --batch-size 64 --lr 5e-4 --seed 0 --force"
SAMPLE="-n $N --scheduler ddim --steps 50 --seed 0 --no-png --force"
mkdir -p "$WORK" "$DOCS"
cd "$WORK"
: > commands.tsv
git -C "$HERE" rev-parse --short HEAD > commit.txt 2>/dev/null || echo unknown > commit.txt  # what ran

# Runs one o2m command, logging its wall time and the command as a user types it.
o2m() {
  local t0
  echo "+ o2m $*" >&2
  t0=$(date +%s%N)
  "$O2M" "$@"
  printf '%s\t%s\n' "$(( ($(date +%s%N) - t0) / 1000000 ))" "o2m $*" >> commands.tsv
}

START=$(date +%s)
ROWS=(samples-teacher samples-teacher-seed1)
for R in 0.3 0.5; do
  T=r$R
  o2m prune digits-teacher --ratio "$R" --seed 0 --no-throughput -o "$T-template" --force
  o2m distill "$T-template" --mode o2mkd -k 1 --kd none $TRAIN -o "$T-nokd"
  o2m distill "$T-template" --mode o2mkd -k 1 --kd output $TRAIN -o "$T-o2okd"
  o2m distill "$T-template" --mode o2mkd -k 4 --p-own 0.5 --kd output $TRAIN -o "$T-o2mkd"
  o2m distill "$T-template" --mode o2mkd -k 1 --kd output ${TRAIN/--steps $STEPS/--steps $((4 * STEPS))} \
    -o "$T-o2okd-4x"
  o2m merge "$T-o2mkd" -o "$T-o2mkd-merged.safetensors" --force
  o2m distill "$T-template" --mode dkdm -k 1 --rho $RHO --init-steps 10 $TRAIN -o "$T-dkdm"
  o2m distill "$T-template" --mode dkdm -k 4 --p-own 0.5 --rho $RHO --init-steps 10 $TRAIN -o "$T-dfo2mkd"
  o2m merge "$T-dfo2mkd" -o "$T-dfo2mkd-merged.safetensors" --force
  for m in nokd o2okd o2okd-4x o2mkd o2mkd-merged dkdm dfo2mkd dfo2mkd-merged; do
    src="$T-$m"
    [ -d "$src" ] || src="$src.safetensors"
    o2m sample "$src" $SAMPLE -o "samples-$T-$m"
    ROWS+=("samples-$T-$m")
  done
done
o2m sample digits-teacher $SAMPLE -o samples-teacher
# The same teacher with another sampling seed: how much FID moves with the seed alone.
o2m sample digits-teacher ${SAMPLE/--seed 0/--seed 1} -o samples-teacher-seed1
o2m score "${ROWS[@]}" --ref digits -o scores --force
SECONDS_TOTAL=$(( $(date +%s) - START ))

"$PY" "$HERE/results_md.py" --work . --seconds "$SECONDS_TOTAL" --docs "$DOCS"
echo "wrote $DOCS/results.md (run in $PWD, $SECONDS_TOTAL s)"
