#!/usr/bin/env bash
# Curriculum stage 1 (docs/CURRICULUM.md): the base model from scratch on the `easy` level (one large object,
# plain background, 128 px), the easy-shapes experiment's recipe, on the stage-0 VAE. Gate: shape >= 85% on
# the easy level's held-out single-object prompts (sdxl eval shapes --level easy --lists single, n = EVAL_N).
#
#   bash scripts/stage1.sh WORK [VAE]          # VAE: default WORK/vae/vae.safetensors, else the shipped one
#
# Env: N (scenes, 8000), STEPS (3000 x BATCH 32 = 96,000 images; the experiment met 89% at ~90,000), LR (8e-4),
# STEPS2 / LR2 (the warm restart if the first cosine ends below the gate: 1500, 5e-4), CHUNK.
source "$(dirname "$0")/stage_common.sh"
work=${1:?usage: stage1.sh WORK [VAE]}
vae=${2:-$work/vae/vae.safetensors}
[ -f "$vae" ] || vae=$shipped
mkdir -p "$work"
[ -f "$work/data-easy/metadata.jsonl" ] || sdxl data shapes --level easy --n "${N:-8000}" --out "$work/data-easy" --seed 1
easy=(--data "$work/data-easy" --batch-size "${BATCH:-32}" --resolution 128 "${recipe[@]}" "${watch[@]}"
      --set validation.shapes_level=easy --set validation.shapes_lists='["single"]' --set model.vae="$vae")
train_until_gate "$work/stage1a" "${STEPS:-3000}" "--level easy --lists single" "single:shape_ok>=0.85" -- \
    "${easy[@]}" --lr "${LR:-8e-4}" --seed 0 --set model.config="$here/configs/mini/base.json" && ok=1 || ok=0
from=$work/stage1a
# not met within one cosine: a warm restart from its export (a new cosine at LR2), as the experiment's second run
if [ "$ok" = 0 ]; then
    train_until_gate "$work/stage1b" "${STEPS2:-1500}" "--level easy --lists single" "single:shape_ok>=0.85" -- \
        "${easy[@]}" --lr "${LR2:-5e-4}" --seed 1 --init "$work/stage1a/model.safetensors" && ok=1 || ok=0
    from=$work/stage1b
fi
ln -sfn "$(basename "$from")" "$work/stage1"   # stage 2 starts from WORK/stage1
[ "$ok" = 1 ]
