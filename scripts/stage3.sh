#!/usr/bin/env bash
# Curriculum stage 3 (docs/CURRICULUM.md): from the stage-2 model, the 256 px multi-aspect stage on the `multi`
# level (1-3 objects, 256 px buckets, soft upscales and crops for the size and crop conditioning). Gate: the
# README's aims on the shipped evaluation lists at 256 px: all-correct >= 90% single, >= 60% pairs.
#
#   bash scripts/stage3.sh WORK [VAE]
#
# Env: N (12000), STEPS (4000 x BATCH 16), LR (3e-4), CHUNK.
source "$(dirname "$0")/stage_common.sh"
work=${1:?usage: stage3.sh WORK [VAE]}
vae=${2:-$work/vae/vae.safetensors}
[ -f "$vae" ] || vae=$shipped
[ -f "$work/stage2/model.safetensors" ] || { echo "stage3: run scripts/stage2.sh $work first" >&2; exit 2; }
[ -f "$work/data-multi/metadata.jsonl" ] || sdxl data shapes --level multi --n "${N:-12000}" --out "$work/data-multi" --seed 3
train_until_gate "$work/stage3" "${STEPS:-4000}" "--lists single,pair --size 256" \
    "single:all_ok>=0.9 pair:all_ok>=0.6" -- \
    --data "$work/data-multi" --batch-size "${BATCH:-16}" --resolution 256 --lr "${LR:-3e-4}" --seed 2 "${recipe[@]}" "${watch[@]}" \
    --init "$work/stage2/model.safetensors" --set model.vae="$vae"
