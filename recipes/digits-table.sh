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
#   + DeepCache     the O2MKD students and their merge sampled with `--deepcache 3` (the O2MKD paper's
#                   "DeepCache + O2MKD" rows), beside the teacher with `--deepcache 3` (DeepCache alone)
#   synthetic       the DKDM paper's baseline: the teacher samples a dataset (DDPM 50 steps) with as many
#                   teacher forwards as the ratio-0.3 DKDM run spent (buffer build + training), and the
#                   template trains on it plainly (--kd none)
# Noise, measured in the same run: the teacher sampled with seeds 0 and 1 (sampling noise), and the
# decisive ratio-0.5 rows (no KD, O2OKD, O2MKD, O2OKD 4x) trained again with seed 1 (training noise).
# DKDM, data-free O2MKD, the baseline and the teacher are also sampled with DDPM 50 steps (ancestral,
# respaced): the sampler that uses the learned variance DKDM's KL trains.
# Budgets (the same for every trained row): 400 steps x batch 64 per student, lr 5e-4, EMA 0.999,
# seed 0. Every model is sampled with DDIM 50 steps, seed 0, $O2M_N images (default 1000) (the teacher
# also with seed 1, to show how much FID moves with the sampling seed alone), and
# scored in one `o2m score` run (digits-classifier FID/KID against the 1797 digits; throughput
# measured in that run). Two lanes of commands run at once, one torch thread each. Writes runs/digits-table/ (or $1),
# and docs/results.md + docs/results-fid-vs-macs.png (or $O2M_DOCS/...).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DEFAULT_WORK=runs/digits-table
# shellcheck source=common.sh
source "$HERE/common.sh"
SAMPLE="-n $N --scheduler ddim --steps 50 --seed 0 --no-png --force"
DDPM="-n $N --scheduler ddpm --steps 50 --seed 0 --no-png --force"

START=$(date +%s)
trap 'kill 0' INT TERM  # Ctrl-C stops both lanes and their o2m processes
# Two lanes run at once, each process on one torch thread: the models are tiny, so two 1-thread processes use
# 2 cores better than one 2-thread process, and one thread gives the same bits on any machine.
# Lane A: ratio 0.3, the synthetic dataset, the teacher's samples. Lane B: ratio 0.5 and its seed-1 rows.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
METHODS=(nokd o2okd o2okd-4x o2mkd o2mkd-merged dkdm dfo2mkd dfo2mkd-merged synth)
SEED1_METHODS=(nokd-s1 o2okd-s1 o2mkd-s1 o2okd-4x-s1)
DDPM_METHODS=(dkdm dfo2mkd synth)
: > commands-a.tsv; : > commands-b.tsv; : > commands-c.tsv
rm -f synthetic.json

# The trained rows of one template, in the order that lets lane A build the synthetic set early.
train_ratio() {
  local R=$1 T=r$1
  o2m prune digits-teacher --ratio "$R" --seed 0 --no-throughput -o "$T-template" --force
  o2m distill "$T-template" --mode o2mkd -k 1 --kd none $TRAIN -o "$T-nokd"
  o2m distill "$T-template" --mode o2mkd -k 1 --kd output $TRAIN -o "$T-o2okd"
  o2m distill "$T-template" --mode o2mkd -k 4 --p-own 0.5 --kd output $TRAIN -o "$T-o2mkd"
  o2m distill "$T-template" --mode o2mkd -k 1 --kd output ${TRAIN/--steps $STEPS/--steps $((4 * STEPS))} \
    -o "$T-o2okd-4x"
  o2m merge "$T-o2mkd" -o "$T-o2mkd-merged.safetensors" --force
  o2m distill "$T-template" --mode dkdm -k 1 --rho $RHO --init-steps 10 $TRAIN -o "$T-dkdm"
  if [ "$R" = 0.3 ]; then synthetic_set "$T-dkdm"; fi
  o2m distill "$T-template" --mode dkdm -k 4 --p-own 0.5 --rho $RHO --init-steps 10 $TRAIN -o "$T-dfo2mkd"
  o2m merge "$T-dfo2mkd" -o "$T-dfo2mkd-merged.safetensors" --force
}

# The DKDM paper's baseline at the DKDM run's teacher-forward budget: build + one forward per sample.
synthetic_set() {
  local IMAGES FWD
  read -r IMAGES FWD < <("$PY" - "$1/manifest.json" <<'PYEOF'
import json, sys
m = json.load(open(sys.argv[1]))
fwd = m["summary"]["buffer"]["teacher_forwards"] + m["config"]["steps"] * m["config"]["batch_size"]
print(fwd // 50, fwd)
PYEOF
)
  o2m sample digits-teacher -n "$IMAGES" --scheduler ddpm --steps 50 --seed 7 --no-png -o synthetic-data --force
  printf '{"images": %d, "steps": 50, "teacher_forwards": %d, "dkdm_forwards": %d}\n' \
    "$IMAGES" "$((IMAGES * 50))" "$FWD" > synthetic.json.tmp
  mv synthetic.json.tmp synthetic.json  # lane B waits for this file: it appears whole or not at all
}

# Every row of one template: sampled with DDIM (all), and with DDPM (the data-free rows and the baseline).
sample_ratio() {
  local T=r$1 m src
  shift
  for m in "$@"; do
    src="$T-$m"
    [ -d "$src" ] || src="$src.safetensors"
    o2m sample "$src" $SAMPLE -o "samples-$T-$m"
  done
  for m in "${DDPM_METHODS[@]}"; do
    o2m sample "$T-$m" $DDPM -o "samples-ddpm-$T-$m"
  done
  o2m sample "$T-o2mkd" $SAMPLE --deepcache 3 -o "samples-$T-o2mkd-dc3"
  o2m sample "$T-o2mkd-merged.safetensors" $SAMPLE --deepcache 3 -o "samples-$T-o2mkd-merged-dc3"
}

lane_a() {
  LOG=commands-a.tsv
  train_ratio 0.3
  o2m distill r0.3-template --mode o2mkd -k 1 --kd none --data synthetic-data $TRAIN -o r0.3-synth
  sample_ratio 0.3 "${METHODS[@]}"
  o2m sample digits-teacher $SAMPLE -o samples-teacher
  # The same teacher with another sampling seed: how much FID moves with the seed alone.
  o2m sample digits-teacher ${SAMPLE/--seed 0/--seed 1} -o samples-teacher-seed1
  o2m sample digits-teacher $DDPM -o samples-ddpm-teacher
  o2m sample digits-teacher $SAMPLE --deepcache 3 -o samples-teacher-dc3
}

lane_b() {
  LOG=commands-b.tsv
  train_ratio 0.5
  # Training noise: the decisive rows again with training seed 1 (sampled with the same seed 0).
  local SEED1=${TRAIN/--seed 0/--seed 1}
  o2m distill r0.5-template --mode o2mkd -k 1 --kd none $SEED1 -o r0.5-nokd-s1
  o2m distill r0.5-template --mode o2mkd -k 1 --kd output $SEED1 -o r0.5-o2okd-s1
  o2m distill r0.5-template --mode o2mkd -k 4 --p-own 0.5 --kd output $SEED1 -o r0.5-o2mkd-s1
  o2m distill r0.5-template --mode o2mkd -k 1 --kd output ${SEED1/--steps $STEPS/--steps $((4 * STEPS))} \
    -o r0.5-o2okd-4x-s1
  while [ ! -f synthetic.json ]; do  # built by lane A after its DKDM run
    kill -0 "$LANE_A" 2>/dev/null || { echo "lane A ended without the synthetic set" >&2; return 1; }
    sleep 2
  done
  o2m distill r0.5-template --mode o2mkd -k 1 --kd none --data synthetic-data $TRAIN -o r0.5-synth
  sample_ratio 0.5 "${METHODS[@]}" "${SEED1_METHODS[@]}"
}

run_lanes digits-table 'two lanes at once (ratio 0.3 + the teacher | ratio 0.5), one torch thread per process; o2m score on the default threads'

ROWS=(samples-teacher samples-teacher-seed1 samples-teacher-dc3)
DDPM_ROWS=(samples-ddpm-teacher)
for R in 0.3 0.5; do
  for m in "${METHODS[@]}"; do ROWS+=("samples-r$R-$m"); done
  [ "$R" = 0.5 ] && for m in "${SEED1_METHODS[@]}"; do ROWS+=("samples-r$R-$m"); done
  ROWS+=("samples-r$R-o2mkd-dc3" "samples-r$R-o2mkd-merged-dc3")
  for m in "${DDPM_METHODS[@]}"; do DDPM_ROWS+=("samples-ddpm-r$R-$m"); done
done
LOG=commands-c.tsv
# Throughput is timed once per model and sampler, 1 run after a warm-up: on 8x8 digits it is an
# overhead-dominated side number (benchmarks/ measures speed).
o2m score "${ROWS[@]}" "${DDPM_ROWS[@]}" --ref digits --throughput-repeats 1 -o scores --force
SECONDS_TOTAL=$(( $(date +%s) - START ))
cat commands-a.tsv commands-b.tsv commands-c.tsv > commands.tsv

"$PY" "$HERE/results_md.py" --work . --seconds "$SECONDS_TOTAL" --docs "$DOCS"
echo "wrote $DOCS/results.md (run in $PWD, $SECONDS_TOTAL s)"
