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

# 2. VAE (f=8, 4 latent channels) on 64 px buckets (it is convolutional, so it runs at 256 px afterwards):
#    100 steps of L1 + KL (stopped at 100 of a 250-step cosine schedule), then 300 steps of L2 + KL;
#    at export scale_factor = 1/std(latents). Then the decoder alone is fine-tuned on the frozen encoder's
#    posterior means (the latent space the UNet sees does not move), while the UNet trains.
sdxl train --task vae "${common[@]}" --output "$work/vae1" --steps "$(steps 250)" --batch-size 16 \
    --resolution 64 --lr 2e-3 --set model.config="$here/configs/mini/base.json" --set train.stop_at="$(steps 100)" \
    --set optim.warmup_steps=20 --set optim.schedule=cosine --set optim.min_lr_ratio=0.1
sdxl train --task vae "${common[@]}" --output "$work/vae" --steps "$(steps 300)" --batch-size 16 --seed 1 \
    --resolution 64 --lr 1e-3 --set model.config="$here/configs/mini/base.json" \
    --set model.vae="$work/vae1/vae.safetensors" --set vae.reconstruction=l2 \
    --set optim.warmup_steps=10 --set optim.schedule=cosine --set optim.min_lr_ratio=0.2
python3 "$here/scripts/finetune_vae_decoder.py" "$work/vae/vae.safetensors" "$work/shapes" \
    "$work/vae-decoder.safetensors" --steps "$(steps 400)" --batch-size 16 --resolution 64 --lr 5e-4

# 3. base, two stages as in the paper (low resolution first, then multi-aspect at the target area):
#    UNet + CLIP-L-style + bigG-style towers trained jointly from scratch on the encoder's posterior means,
#    size/crop/target conditioning, 10% caption dropout, min-SNR-gamma 5, EMA;
#    stage 2 adds offset noise 0.05 on 256 px multi-aspect buckets.
base_common=(--set model.vae="$work/vae/vae.safetensors" --set train.train_text_encoders=true
             --set loss.min_snr_gamma=5 --set loss.latent_sample=false --set ema.enabled=true)
sdxl train "${common[@]}" "${base_common[@]}" --output "$work/base128" --steps "$(steps 600)" --batch-size 32 \
    --resolution 128 --lr 1e-3 --set model.config="$here/configs/mini/base.json" --set checkpoint.every=100 \
    --set optim.warmup_steps=50 --set optim.schedule=cosine --set optim.min_lr_ratio=0.2 --set ema.decay=0.99
sdxl train "${common[@]}" "${base_common[@]}" --output "$work/base" --steps "$(steps 120)" --batch-size 8 \
    --resolution 256 --lr 2e-4 --init "$work/base128/model.safetensors" --set loss.offset_noise=0.05 \
    --set ema.decay=0.98 --set checkpoint.every=100

# 4. refiner: its own small bigG-style tower and UNet, trained on the 200 lowest noise levels
sdxl train "${common[@]}" --output "$work/refiner" --steps "$(steps 250)" --batch-size 16 --resolution 128 \
    --lr 1e-3 --set model.config="$here/configs/mini/refiner.json" --set model.vae="$work/vae/vae.safetensors" \
    --set train.train_text_encoders=true --set loss.latent_sample=false --set optim.warmup_steps=30 \
    --set optim.schedule=cosine --set ema.enabled=true --set ema.decay=0.99 --set checkpoint.every=100

# 5. put the fine-tuned decoder into both files (same encoder, so the same latent space)
python3 "$here/scripts/swap_vae.py" "$work/base/model.safetensors" "$work/vae-decoder.safetensors" \
    "$work/base-final.safetensors"
python3 "$here/scripts/swap_vae.py" "$work/refiner/model.safetensors" "$work/vae-decoder.safetensors" \
    "$work/refiner-final.safetensors"

# 6. ship: fp16, official single-file layout (sdxl inspect reads them like any SDXL file)
mkdir -p "$work/ship"
sdxl convert "$work/base-final.safetensors" "$work/ship/base.safetensors" --dtype fp16
sdxl convert "$work/refiner-final.safetensors" "$work/ship/refiner.safetensors" --dtype fp16
echo "trained: $work/ship/base.safetensors $work/ship/refiner.safetensors"
