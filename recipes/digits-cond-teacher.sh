#!/usr/bin/env bash
# The shipped class-conditional digits teacher (o2mcli/assets/digits_cond_teacher.safetensors, the
# `digits-cond-teacher` model spec): the same UNet, schedule and budget as recipes/digits-teacher.sh, with a
# class embedding for the 10 digits plus a null class, each label dropped to the null class with
# probability 0.1 so classifier-free guidance works. About 25 minutes on a 2-core CPU.
set -euo pipefail
O2M=${O2M:-o2m}
$O2M train --data digits --cond class --label-dropout 0.1 --variance learned --channels 32,64,64 \
  --layers-per-block 1 --norm-groups 8 --attention-level 1 --steps 6000 --batch-size 128 --lr 1e-3 \
  --ema-decay 0.999 --seed 0 --device cpu -o "${1:-o2mcli/assets/digits_cond_teacher.safetensors}" --force
