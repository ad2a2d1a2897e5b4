#!/usr/bin/env bash
# Curriculum stage 0 (docs/CURRICULUM.md): a VAE that keeps small shapes. Trains the decoder of a VAE (f = 8,
# 4 latent channels, the SDXL structure of configs/mini/base.json; default: the shipped one) on the `vae` level
# (more and smaller objects, every background kind) with the edge-weighted L1 loss, on the frozen encoder's
# cached latents: the latent space stays, so every base and refiner trained on it keeps working. Two phases:
#   A. 64 px patches (16 a step, cheap), a fixed number of steps;
#   B. whole images (GroupNorm then normalises over what it normalises over when a whole image is decoded;
#      a patch-trained decoder shifts colours and loses small shapes there), in chunks of CHUNK steps, each
#      followed by the gate: the detector's ceiling after encode + decode, shape >= 95% on single objects and
#      >= 85% on pairs (`sdxl eval vae-ceiling`, n = EVAL_N per list). Stops once it is met.
#
#   bash scripts/stage0_vae.sh WORK            # one thread; run in the background: nohup bash ... &
#
# Env: N (scenes, 3000), FROM (the VAE to continue; default the shipped one), LR (2e-4), EDGE (vae.edge_weight, 4),
# WIDEN (vae.decoder_ch_mult, e.g. [1,2,4,4]: a fresh wider decoder on the kept encoder, for when the gate plateaus),
# STEPS_A (2000 x BATCH_A 16 patches of 64 px), STEPS_B (1500 x BATCH_B 4 whole images), CHUNK_B (250, phase B steps between gates).
# Output: WORK/vae/vae.safetensors (a VAE-only file; `sdxl convert MODEL OUT --vae` bakes it into a model).
source "$(dirname "$0")/stage_common.sh"
work=${1:?usage: stage0_vae.sh WORK}
CHUNK=${CHUNK_B:-250}
mkdir -p "$work"
[ -f "$work/data-vae/metadata.jsonl" ] || sdxl data shapes --level vae --n "${N:-3000}" --out "$work/data-vae" --seed 100
[ -f "$work/vae-ceiling-before.json" ] || sdxl eval vae-ceiling --vae "${FROM:-$shipped}" --n "$EVAL_N" --json \
    > "$work/vae-ceiling-before.json"
source "$here/scripts/decoder_recipe.sh"
vae_args=("${decoder_recipe[@]}" --data "$work/data-vae" --set data.cache_dir="$work/cache" --resume)
[ -n "${LR:-}" ] && vae_args+=(--lr "$LR")
[ -n "${EDGE:-}" ] && vae_args+=(--set vae.edge_weight="$EDGE")
[ -n "${WIDEN:-}" ] && vae_args+=(--set vae.decoder_ch_mult="$WIDEN")
stamp "phase A: 64 px patches, ${STEPS_A:-2000} steps"
sdxl train "${vae_args[@]}" --output "$work/vae-patch" --steps "${STEPS_A:-2000}" --batch-size "${BATCH_A:-16}" \
    --set vae.patch_size=64 --set model.vae="${FROM:-$shipped}" --set checkpoint.every=500
out="$work/vae"
total=${STEPS_B:-1500}
stop=0
while [ "$stop" -lt "$total" ]; do
    stop=$(( stop + CHUNK )); [ "$stop" -gt "$total" ] && stop=$total
    if [ ! -s "$out/ceiling-$stop.json" ]; then
        stamp "phase B: whole images, to step $stop of $total"
        sdxl train "${vae_args[@]}" --output "$out" --steps "$total" --batch-size "${BATCH_B:-4}" \
            --set vae.patch_size=0 --set model.vae="$work/vae-patch/vae.safetensors" \
            --set train.stop_at="$stop" --set checkpoint.every="$CHUNK"
        sdxl eval vae-ceiling --vae "$out/vae.safetensors" --n "$EVAL_N" --json > "$out/ceiling-$stop.json.part"
        mv "$out/ceiling-$stop.json.part" "$out/ceiling-$stop.json"
    fi
    if python3 "$here/scripts/stage_gate.py" "$out/ceiling-$stop.json" single:shape_ok\>=0.95 pair:shape_ok\>=0.85 \
        | tee "$out/gate-$stop.txt"; then
        stamp "gate met at step $stop: $out/vae.safetensors"
        exit 0
    fi
done
stamp "gate NOT met after $total steps (see $out/gate-$total.txt): widen the decoder"
exit 1
