#!/usr/bin/env bash
# The paper's Table 2 (size conditioning) in miniature, from the curriculum's stage-2 model (issue 16 item 6).
#
#   bash scripts/ablation.sh WORK INIT [VAE]      # INIT: the stage-2 model (e.g. runs/cur/stage2/model.safetensors)
#
# Data: the `mid` level (1-2 objects, every background, 128 px) with SMALL of the scenes rendered small and
# upscaled (soft), so size conditioning has something to tell apart: the paper's ImageNet at 512 px held many
# images below the training size. Three continuations of INIT at equal compute (same steps, batch, seed, recipe):
#   only-large : only images whose original size is >= 128 px on the shorter side (the paper's CIN-512-only)
#   nocond     : all images, no size conditioning (original size recorded as the target size)
#   sizecond   : all images with size conditioning (sampled with original size = training size)
# Recipe: the stages' (scripts/stage_common.sh: v-prediction, zero-terminal SNR, min-SNR in [1, 5], logit-normal
# t, both text towers, EMA). Each variant for every training seed in SEEDS, then `sdxl eval shapes` on the level's
# held-out single and pair prompts (FD and prompt accuracy, Wilson 95% intervals), and scripts/ablation_report.py.
# Env: SEEDS ("0 1 2"), STEPS (1000 x BATCH 32), LR (3e-4), SMALL (0.5), N (12000), EVAL_N (100).
source "$(dirname "$0")/stage_common.sh"
work=${1:?usage: ablation.sh WORK INIT [VAE]}
init=${2:?usage: ablation.sh WORK INIT [VAE]}
vae=${3:-}
[ -f "$init" ] || { echo "ablation: INIT $init: no such file (run scripts/stage2.sh first)" >&2; exit 2; }
mkdir -p "$work"
data="$work/data"
[ -f "$data/metadata.jsonl" ] || sdxl data shapes --level mid --soft-upscales "${SMALL:-0.5}" --n "${N:-12000}" \
    --out "$data" --seed 5
vae_args=()
[ -n "$vae" ] && vae_args=(--set model.vae="$vae")
for seed in ${SEEDS:-0 1 2}; do
  for variant in only-large nocond sizecond; do
    extra=()
    case $variant in
      only-large) extra=(--set data.min_size=128) ;;
      nocond) extra=(--set data.size_conditioning=false) ;;
      sizecond) extra=() ;;
    esac
    out="$work/$variant-s$seed"
    if [ ! -f "$out/model.safetensors" ]; then
        stamp "ablation: $variant, seed $seed"
        sdxl train --data "$data" --output "$out" --init "$init" --seed "$seed" --steps "${STEPS:-1000}" \
            --batch-size "${BATCH:-32}" --resolution 128 --lr "${LR:-3e-4}" "${recipe[@]}" "${vae_args[@]}" \
            --set data.cache_dir="$work/cache" --set checkpoint.every=250 --resume "${extra[@]}"
    fi
    [ -s "$out/eval.json" ] || { sdxl eval shapes --model "$out/model.safetensors" --level mid --lists single,pair \
        --n "$EVAL_N" --seed 0 --detector-check 0 --json --size 128 --original-size 128 > "$out/eval.json.part" \
        && mv "$out/eval.json.part" "$out/eval.json"; }
  done
done
python3 "$here/scripts/ablation_report.py" "$work"
