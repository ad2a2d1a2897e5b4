#!/usr/bin/env bash
# Train the miniature SDXL shipped in src/sdxl/assets/default/ from nothing, with this project's own tools.
#
#   bash scripts/train_default.sh [WORKDIR] [SCALE]
#
# SCALE multiplies every step count (1 = the shipped run; tests/test_default_model.py runs 0.005 as a smoke test).
# Stages: the procedural dataset -> the VAE -> base UNet + both text towers jointly -> refiner (t < 200) ->
# fp16 official-layout single files. Architecture: configs/mini/base.json and configs/mini/refiner.json.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-runs/default}"
scale="${2:-1}"
steps() { python3 -c "import sys; print(max(2, int(round($1 * $scale))))"; }
mkdir -p "$work"
n_images=$(python3 -c "print(max(16, int(6000 * min(1.0, $scale * 20))))")

# 1. data: 6000 captioned scenes at many aspect ratios (30% rendered small and upscaled, 15% cropped)
[ -f "$work/shapes/metadata.jsonl" ] || sdxl data shapes --n "$n_images" --out "$work/shapes" --seed 0

common=(--data "$work/shapes" --seed 0 --set data.bucket_step=32 --set train.progress=false)

# 2. VAE (f=8, 4 latent channels): L1 + KL on 64 px buckets (the autoencoder is convolutional, so it runs at
#    256 px afterwards), cosine LR; at export scale_factor = 1/std(latents)
sdxl train --task vae "${common[@]}" --output "$work/vae" --steps "$(steps 250)" --batch-size 16 \
    --resolution 64 --lr 2e-3 --set model.config="$here/configs/mini/base.json" \
    --set optim.warmup_steps=20 --set optim.schedule=cosine --set optim.min_lr_ratio=0.1

# 3. base, two stages as in the paper (low resolution first, then multi-aspect at the target area):
#    UNet + CLIP-L-style + bigG-style towers trained jointly from scratch, size/crop/target conditioning,
#    10% caption dropout, min-SNR-gamma 5; stage 2 adds offset noise 0.05 on 256 px multi-aspect buckets.
base_common=(--set model.vae="$work/vae/vae.safetensors" --set train.train_text_encoders=true
             --set loss.min_snr_gamma=5 --set ema.enabled=true --set checkpoint.every=200)
sdxl train "${common[@]}" "${base_common[@]}" --output "$work/base128" --steps "$(steps 600)" --batch-size 32 \
    --resolution 128 --lr 1e-3 --set model.config="$here/configs/mini/base.json" \
    --set optim.warmup_steps=50 --set optim.schedule=cosine --set optim.min_lr_ratio=0.2 --set ema.decay=0.99
sdxl train "${common[@]}" "${base_common[@]}" --output "$work/base" --steps "$(steps 150)" --batch-size 8 \
    --resolution 256 --lr 2e-4 --init "$work/base128/model.safetensors" --set loss.offset_noise=0.05 \
    --set ema.decay=0.98

# 4. refiner: its own small bigG-style tower and UNet, trained on the 200 lowest noise levels
sdxl train "${common[@]}" --output "$work/refiner" --steps "$(steps 250)" --batch-size 16 --resolution 128 \
    --lr 1e-3 --set model.config="$here/configs/mini/refiner.json" --set model.vae="$work/vae/vae.safetensors" \
    --set train.train_text_encoders=true --set optim.warmup_steps=30 --set optim.schedule=cosine \
    --set ema.enabled=true --set ema.decay=0.99 --set checkpoint.every=200

# 5. ship: fp16, official single-file layout (sdxl inspect reads them like any SDXL file)
mkdir -p "$work/ship"
sdxl convert "$work/base/model.safetensors" "$work/ship/base.safetensors" --dtype fp16
sdxl convert "$work/refiner/model.safetensors" "$work/ship/refiner.safetensors" --dtype fp16
echo "trained: $work/ship/base.safetensors $work/ship/refiner.safetensors"
