#!/usr/bin/env bash
# Curriculum stage 1 (docs/CURRICULUM.md): the base model from scratch on the `easy` level (one large object,
# plain background, 128 px), the easy-shapes experiment's recipe, on the stage-0 VAE. Gate: shape >= 85% on
# the easy level's held-out single-object prompts (sdxl eval shapes --level easy --lists single, n = EVAL_N).
#
#   bash scripts/stage1.sh WORK [VAE]          # VAE: default WORK/vae/vae.safetensors, else the shipped one
#
# Env: N (scenes, 8000), STEPS (3000 x BATCH 32 = 96,000 images; the experiment met 89% at ~90,000), LR (8e-4),
# CHUNK.
source "$(dirname "$0")/stage_common.sh"
work=${1:?usage: stage1.sh WORK [VAE]}
vae=${2:-$work/vae/vae.safetensors}
[ -f "$vae" ] || vae=$shipped
mkdir -p "$work"
[ -f "$work/data-easy/metadata.jsonl" ] || sdxl data shapes --level easy --n "${N:-8000}" --out "$work/data-easy" --seed 1
train_until_gate "$work/stage1" "${STEPS:-3000}" "--level easy --lists single" "single:shape_ok>=0.85" -- \
    --data "$work/data-easy" --batch-size "${BATCH:-32}" --resolution 128 --lr "${LR:-8e-4}" --seed 0 "${recipe[@]}" "${watch[@]}" \
    --set validation.shapes_level=easy --set validation.shapes_lists='["single"]' \
    --set model.config="$here/configs/mini/base.json" --set model.vae="$vae"
