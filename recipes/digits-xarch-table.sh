#!/usr/bin/env bash
# Distillation across architectures on the embedded default, in the spirit of the DKDM paper's Table 3:
#   UNet teacher -> DiT student   the shipped class-conditional UNet (digits-cond-teacher) into a fresh DiT
#                                 (recipes/configs/dit-student.json: 4 blocks, 4 heads x 16, patch 2)
#   DiT teacher -> UNet student   the shipped class-conditional DiT (digits-dit-teacher) into a fresh UNet
#                                 (recipes/configs/unet-student.json: the UNet teacher's shape at half width)
# Each direction trains three students from the same random init, on the same budget:
#   DKDM            data-free: the teacher's own noisy samples in a dynamic buffer (rho 0.2, 10-step DDIM jumps)
#   data KD         O2OKD, output KD on the labelled digits (`--mode o2mkd -k 1 --kd output`)
#   no KD           plain diffusion training on the labelled digits (`--kd none`: the teacher never runs)
# and every model is sampled once, 1000 images balanced over the 10 classes, guidance 1, DDIM 50, seed 0, and
# scored in one `o2m score` run: FID with the digits classifier's features against the 1797 digits, and class
# accuracy (the share of samples that classifier reads as the class asked for).
# Noise, measured in the same run: each teacher sampled again with seed 1 (sampling noise), and DKDM trained again
# with seed 1 in each direction (training noise).
# Budget: $O2M_STEPS (default 2000) steps x batch 64 per student, lr 5e-4, EMA 0.999, seed 0. Two lanes of commands
# run at once (one direction each), one torch thread each.
# Writes runs/digits-xarch-table/ (or $1) and the cross-architecture section of docs/results.md (or $O2M_DOCS/...).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DEFAULT_WORK=runs/digits-xarch-table
O2M_STEPS=${O2M_STEPS:-2000}  # the students start from random weights, not from a pruned teacher
# shellcheck source=common.sh
source "$HERE/common.sh"
G1="-n $N --scheduler ddim --steps 50 --seed 0 --no-png --force"
DIT="$HERE/configs/dit-student.json"
UNET="$HERE/configs/unet-student.json"

# The three students of one direction and DKDM's seed-1 twin; $1 the teacher, $2 the student config, $3 the prefix.
direction() {
  local teacher=$1 cfg=$2 p=$3
  o2m distill --teacher "$teacher" --student-config "$cfg" --mode dkdm -k 1 --rho "$RHO" --init-steps 10 $TRAIN \
    -o "$p-dkdm"
  o2m distill --teacher "$teacher" --student-config "$cfg" --mode o2mkd -k 1 --kd output $TRAIN -o "$p-kd"
  o2m distill --teacher "$teacher" --student-config "$cfg" --mode o2mkd -k 1 --kd none $TRAIN -o "$p-none"
  o2m distill --teacher "$teacher" --student-config "$cfg" --mode dkdm -k 1 --rho "$RHO" --init-steps 10 \
    ${TRAIN/--seed 0/--seed 1} -o "$p-dkdm-s1"
  o2m sample "$teacher" $G1 -o "g1-$p-teacher"
  o2m sample "$teacher" ${G1/--seed 0/--seed 1} -o "g1-$p-teacher-seed1"
  for m in dkdm kd none dkdm-s1; do o2m sample "$p-$m" $G1 -o "g1-$p-$m"; done
}

START=$(date +%s)
trap 'kill 0' INT TERM
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
: > commands-a.tsv; : > commands-b.tsv; : > commands-c.tsv

lane_a() {
  LOG=commands-a.tsv
  direction digits-cond-teacher "$DIT" u2d
}

lane_b() {
  LOG=commands-b.tsv
  direction digits-dit-teacher "$UNET" d2u
}

run_lanes digits-xarch-table 'two lanes at once (UNet -> DiT | DiT -> UNet), one torch thread per process; o2m score on the default threads'

LOG=commands-c.tsv
ROWS=()
for p in u2d d2u; do
  for m in teacher teacher-seed1 dkdm dkdm-s1 kd none; do ROWS+=("g1-$p-$m"); done
done
o2m score "${ROWS[@]}" --ref digits --throughput-repeats 1 -o scores --force
SECONDS_TOTAL=$(( $(date +%s) - START ))
cat commands-a.tsv commands-b.tsv commands-c.tsv > commands.tsv

"$PY" "$HERE/results_xarch_md.py" --work . --seconds "$SECONDS_TOTAL" --docs "$DOCS"
echo "wrote the cross-architecture section of $DOCS/results.md (run in $PWD, $SECONDS_TOTAL s)"
