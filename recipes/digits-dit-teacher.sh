#!/usr/bin/env bash
# The shipped class-conditional DiT digits teacher (o2mcli/assets/digits_dit_teacher.safetensors, the
# `digits-dit-teacher` model spec): diffusers' DiTTransformer2DModel from recipes/configs/dit-teacher.json (6 blocks,
# 4 heads x 32, patch 2 on the 8x8 digits, learned variance, 10 classes plus the null class), trained with label
# dropout 0.1 so classifier-free guidance works; the UNet teachers' schedule, batch and step count, lr 5e-4.
# About 20 minutes on an idle 2-core CPU. The shipped file was trained by this command in three pieces (stopped and
# continued with --resume at steps 2600 and 4000, the last piece after the random streams became per step), so a
# rerun gives an equivalent teacher, not the same bits.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
O2M=${O2M:-o2m}
$O2M train --data digits --model-config "$HERE/configs/dit-teacher.json" --cond class --label-dropout 0.1 \
  --steps 6000 --batch-size 128 --lr 5e-4 --ema-decay 0.999 --seed 0 --device cpu \
  -o "${1:-$HERE/../o2mcli/assets/digits_dit_teacher.safetensors}" --force
