#!/usr/bin/env bash
# The shipped digits teacher (o2mcli/assets/digits_teacher.safetensors), reproduced:
# DDPM with learned variance (improved-DDPM hybrid loss), T=1000 linear betas,
# UNet2DModel (32, 64, 64), attention at 4x4, 1.1M parameters, EMA 0.999.
# About 30 minutes on a 2-core CPU. Deterministic on CPU for a given seed and torch version. The shipped file
# was trained before `o2m train` ran on the distillation engine (issue #12), which draws the batches from
# another generator: the recipe now gives a teacher of the same recipe and quality, not the same bits.
set -euo pipefail
O2M=${O2M:-o2m}
$O2M train --data digits --variance learned --channels 32,64,64 --layers-per-block 1 \
  --norm-groups 8 --attention-level 1 --steps 6000 --batch-size 128 --lr 1e-3 --ema-decay 0.999 \
  --seed 0 --device cpu -o "${1:-o2mcli/assets/digits_teacher.safetensors}" --force
