#!/usr/bin/env bash
# Curriculum stage 2 (docs/CURRICULUM.md): from the stage-1 model, 128 px with the full variety of the `mid`
# level (one and two objects with relations, small and large at their 256 px latent sizes, every background
# kind, a few crops and soft upscales). Gate (proposed; the issue sets none for this stage): shape >= 85% on
# the level's single objects and all-correct >= 50% on its pairs.
#
#   bash scripts/stage2.sh WORK [VAE]
#
# Env: N (12000), STEPS (4000 x BATCH 32), LR (5e-4), CHUNK.
source "$(dirname "$0")/stage_common.sh"
work=${1:?usage: stage2.sh WORK [VAE]}
vae=${2:-$work/vae/vae.safetensors}
[ -f "$vae" ] || vae=$shipped
[ -f "$work/stage1/model.safetensors" ] || { echo "stage2: run scripts/stage1.sh $work first" >&2; exit 2; }
[ -f "$work/data-mid/metadata.jsonl" ] || sdxl data shapes --level mid --n "${N:-12000}" --out "$work/data-mid" --seed 2
train_until_gate "$work/stage2" "${STEPS:-4000}" "--level mid --lists single,pair" \
    "single:shape_ok>=0.85 pair:all_ok>=0.5" -- \
    --data "$work/data-mid" --batch-size "${BATCH:-32}" --resolution 128 --lr "${LR:-5e-4}" --seed 1 "${recipe[@]}" "${watch[@]}" \
    --set validation.shapes_level=mid --init "$work/stage1/model.safetensors" --set model.vae="$vae"
