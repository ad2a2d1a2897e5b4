#!/usr/bin/env bash
# The paper's Table 2 (size conditioning) in miniature, on the shapes dataset.
#
#   bash scripts/ablation.sh WORKDIR VAE_FILE [STEPS] [SEEDS]
#
# Three small base models, equal compute (same steps, batch, architecture, seed), training size 128 px:
#   only-large : only images whose original size is >= 128 px on the shorter side (the paper's CIN-512-only)
#   nocond     : all images, no size conditioning (original size recorded as the target size)
#   sizecond   : all images with size conditioning (sampled with original size = training size)
# All three: configs/mini/base.json (8 GroupNorm groups), v-prediction on the zero-terminal-SNR schedule with
# min-SNR weights clamped to [1, 5], text towers trained jointly, VAE latents
# of centre crops cached once and shared (the shipped model's recipe; see scripts/train_default.sh).
# Then `sdxl eval shapes` on each (held-out single and pair prompts; FD and prompt accuracy, Wilson 95% CI),
# for every seed in SEEDS (training seeds; sampling uses the same prompt list).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:?workdir}"
vae="${2:?vae file}"
steps="${3:-150}"
seeds="${4:-0 1}"
data="$work/../shapes"
[ -d "$data" ] || data="${SHAPES:-$work/shapes}"
[ -f "$data/metadata.jsonl" ] || sdxl data shapes --n 6000 --out "$data" --seed 0

for seed in $seeds; do
  for variant in only-large nocond sizecond; do
    extra=()
    case $variant in
      only-large) extra=(--set data.min_size=128) ;;
      nocond) extra=(--set data.size_conditioning=false) ;;
      sizecond) extra=() ;;
    esac
    out="$work/$variant-s$seed"
    [ -f "$out/model.safetensors" ] || sdxl train --data "$data" --output "$out" --seed "$seed" \
        --steps "$steps" --batch-size 16 --resolution 128 --lr 1e-3 \
        --set model.config="$here/configs/mini/base.json" --set model.vae="$vae" \
        --set data.bucket_step=32 --set train.train_text_encoders=true --set loss.min_snr_gamma=5 \
        --set optim.warmup_steps=20 --set train.progress=false --set checkpoint.every=0 \
        --set model.prediction=v --set model.zero_terminal_snr=true --set loss.min_snr_floor=1 \
        --set loss.latent_sample=false --set data.cache_latents=true \
        --set data.crop=center --set data.cache_dir="$work/cache" "${extra[@]}"
    sdxl eval shapes --model "$out/model.safetensors" --n "${EVAL_N:-24}" --kinds single,pair --seed 0 \
        --steps 12 --detector-check 0 --json --size 128 --original-size 128 > "$out/eval.json"
  done
done
python3 "$here/scripts/ablation_report.py" "$work"
