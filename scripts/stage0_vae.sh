#!/usr/bin/env bash
# Curriculum stage 0 (docs/CURRICULUM.md): a VAE that keeps small shapes. Continues the shipped VAE (f = 8,
# 4 latent channels, the SDXL structure of configs/mini/base.json) on the `vae` level (more and smaller
# objects, every background kind) with the edge-weighted L1 loss, until the detector's ceiling after
# encode + decode meets the gate: shape >= 95% on single objects and >= 85% on pairs (n = EVAL_N per list).
#
#   bash scripts/stage0_vae.sh WORK            # one thread; run in the background: nohup bash ... &
#
# Env: N (scenes, 8000), STEPS (6000 x BATCH 16 patches), LR (2e-4), EDGE (vae.edge_weight, 4), PATCH (64),
# CHUNK, DECODER_ONLY (1: train only the decoder, on cached latents of the frozen encoder; the latent space,
# and any base trained on it, stays), FROM (the VAE to continue; default the shipped one), CACHE_DIR (where the
# latent cache lives; default WORK/vae/cache).
source "$(dirname "$0")/stage_common.sh"
work=${1:?usage: stage0_vae.sh WORK}
mkdir -p "$work"
[ -f "$work/data-vae/metadata.jsonl" ] || sdxl data shapes --level vae --n "${N:-8000}" --out "$work/data-vae" --seed 100
[ -f "$work/vae-ceiling-before.json" ] || sdxl eval vae-ceiling --vae "$shipped" --n "$EVAL_N" --json \
    > "$work/vae-ceiling-before.json"
out="$work/vae"
total=${STEPS:-6000}
stop=0
while [ "$stop" -lt "$total" ]; do
    stop=$(( stop + CHUNK )); [ "$stop" -gt "$total" ] && stop=$total
    stamp "VAE to step $stop of $total"
    sdxl train --task vae --data "$work/data-vae" --output "$out" --steps "$total" --batch-size "${BATCH:-16}" --resolution 256 \
        --lr "${LR:-2e-4}" --seed 0 --set data.bucket_step=32 --set train.progress=false \
        --set model.config="$here/configs/mini/base.json" --set model.vae="${FROM:-$shipped}" --set data.cache_dir="${CACHE_DIR:-}" \
        --set vae.patch_size="${PATCH:-64}" --set vae.edge_weight="${EDGE:-4}" --set optim.warmup_steps=50 \
        --set optim.schedule=cosine --set optim.min_lr_ratio=0.1 --set ema.enabled=true --set ema.decay=0.995 \
        ${DECODER_ONLY:+--set vae.decoder_only=true --set data.cache_latents=true} \
        --set train.stop_at="$stop" --set checkpoint.every="$CHUNK" --resume
    sdxl eval vae-ceiling --vae "$out/vae.safetensors" --n "$EVAL_N" --json > "$out/ceiling-$stop.json"
    if python3 "$here/scripts/stage_gate.py" "$out/ceiling-$stop.json" single:shape_ok\>=0.95 pair:shape_ok\>=0.85 \
        | tee "$out/gate-$stop.txt"; then
        stamp "gate met at step $stop: $out/vae.safetensors"
        exit 0
    fi
done
stamp "gate NOT met after $total steps (see $out/gate-$total.txt): widen the VAE or change the loss"
exit 1
