#!/usr/bin/env bash
# Train the miniature SDXL shipped in src/sdxl/assets/default/ from nothing, with this project's own tools.
#
#   bash scripts/train_default.sh [WORKDIR] [SCALE]
#
# SCALE multiplies every step count (1 = the shipped run; tests/test_default_model.py runs 0.005 as a smoke test).
# Stages: the procedural dataset -> the VAE -> base UNet + both text towers jointly -> refiner (t < 200, then
# t < 300 at 256 px) -> fp16 official-layout single files. Architecture: configs/mini/base.json and
# configs/mini/refiner.json.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-runs/default}"
scale="${2:-1}"
steps() { python3 -c "import sys; print(max(2, int(round($1 * $scale))))"; }
mkdir -p "$work"
n_images=${RECIPE_IMAGES:-$(python3 -c "print(max(16, int(6000 * min(1.0, $scale * 20))))")}
# Smoke runs only (tests/test_default_model.py): RECIPE_IMAGES sets the dataset's size, RECIPE_MAX_BATCH and
# RECIPE_MAX_RES cap the --batch-size and --resolution of every `sdxl train` below. Unset: as shipped.
if [ -n "${RECIPE_MAX_BATCH:-}${RECIPE_MAX_RES:-}" ]; then
    sdxl() {
        local args=() prev="" a
        for a in "$@"; do
            local cap=""
            case "$prev" in
                --batch-size) cap="${RECIPE_MAX_BATCH:-}" ;;
                --resolution) cap="${RECIPE_MAX_RES:-}" ;;
            esac
            prev="$a"
            if [ -n "$cap" ] && [ "$a" -gt "$cap" ]; then a="$cap"; fi
            args+=("$a")
        done
        command sdxl "${args[@]}"
    }
fi

# 1. data: 6000 captioned scenes at many aspect ratios (30% rendered small and upscaled, 15% cropped)
[ -f "$work/shapes/metadata.jsonl" ] || sdxl data shapes --n "$n_images" --out "$work/shapes" --seed 0

common=(--data "$work/shapes" --seed 0 --set data.bucket_step=32 --set train.progress=false)

# 2. VAE (f=8, 4 latent channels, 1.25M params). The shipped VAE's lineage, exactly as it ran:
#    a. 100 steps of L1 + KL on whole images at 64 px (stopped at 100 of a 250-step cosine schedule), then
#       300 steps of L2 + KL;
#    b. 1457 steps of L1 + KL on random 64 px patches cut from 256 px buckets (`vae.patch_size`: the VAE
#       then sees objects at the scale it will decode them; stopped at 1457 of 2500 by SIGTERM);
#    c. GroupNorm moved from 32 groups to 8 (scripts/regroup.py: with 32 channels and 32 groups every norm
#       is an instance norm, which erases each channel's per-image mean, i.e. the flat colours of this
#       data, and made the decoder's colours depend on the image size), then 1500 more patch steps.
#    At export scale_factor = 1/std(latents).
sdxl train --task vae "${common[@]}" --output "$work/vae1" --steps "$(steps 250)" --batch-size 16 \
    --resolution 64 --lr 2e-3 --set model.config="$here/configs/mini/base32.json" --set train.stop_at="$(steps 100)" \
    --set optim.warmup_steps=20 --set optim.schedule=cosine --set optim.min_lr_ratio=0.1
sdxl train --task vae "${common[@]}" --output "$work/vae2" --steps "$(steps 300)" --batch-size 16 --seed 1 \
    --resolution 64 --lr 1e-3 --set model.config="$here/configs/mini/base32.json" \
    --set model.vae="$work/vae1/vae.safetensors" --set vae.reconstruction=l2 \
    --set optim.warmup_steps=10 --set optim.schedule=cosine --set optim.min_lr_ratio=0.2
sdxl train --task vae "${common[@]}" --output "$work/vae3" --steps "$(steps 2500)" --batch-size 16 --seed 2 \
    --resolution 256 --lr 1e-3 --set model.config="$here/configs/mini/base32.json" \
    --set model.vae="$work/vae2/vae.safetensors" --set vae.patch_size=64 --set train.stop_at="$(steps 1457)" \
    --set optim.warmup_steps=50 --set optim.schedule=cosine --set optim.min_lr_ratio=0.05 \
    --set ema.enabled=true --set ema.decay=0.995
python3 "$here/scripts/regroup.py" "$work/vae3/vae.safetensors" "$work/vae3-g8.safetensors" --vae 8
sdxl train --task vae "${common[@]}" --output "$work/vae" --steps "$(steps 1500)" --batch-size 16 --seed 3 \
    --resolution 256 --lr 5e-4 --set model.config="$here/configs/mini/base.json" \
    --set model.vae="$work/vae3-g8.safetensors" --set vae.patch_size=64 \
    --set optim.warmup_steps=20 --set optim.schedule=cosine --set optim.min_lr_ratio=0.05 \
    --set ema.enabled=true --set ema.decay=0.99
vae="$work/vae/vae.safetensors"
#    d. ninth session (docs/CURRICULUM.md, stage 0): the decoder alone, so the latent space every model below
#       trains on stays, on the frozen encoder's cached latents of 3,000 `vae`-level scenes (1-3 objects, small
#       ones down to 3 latent px, every background) with edge-weighted L1 (`vae.edge_weight = 4`): 64 px patches
#       (a 6000-step cosine stopped at 1884), then whole images, 4 a step, where GroupNorm sees the statistics of
#       a whole image as when it decodes one (the patch-trained decoder shifted small objects' colours there).
#       Every model below is trained on `$vae` and gets this decoder at the end (step 5).
[ -f "$work/shapes-vae/metadata.jsonl" ] || sdxl data shapes --level vae --n "${RECIPE_IMAGES:-3000}" \
    --out "$work/shapes-vae" --seed 100
source "$here/scripts/decoder_recipe.sh"
dec=("${decoder_recipe[@]}" --data "$work/shapes-vae" --set data.cache_dir="$work/vae-dec-cache")
sdxl train "${dec[@]}" --output "$work/vae-dec64" --steps "$(steps 6000)" --batch-size 16 --set vae.patch_size=64 \
    --set model.vae="$vae" --set train.stop_at="$(steps 1884)"
sdxl train "${dec[@]}" --output "$work/vae-dec" --steps "$(steps 1500)" --batch-size 4 --set vae.patch_size=0 \
    --set model.vae="$work/vae-dec64/vae.safetensors" --set train.stop_at="$(steps ${VAE_DEC_STOP:-500})"
decoder="$work/vae-dec/vae.safetensors"

# 3. base UNet + CLIP-L-style + bigG-style towers trained jointly from scratch: size/crop/target conditioning,
#    10% caption dropout, min-SNR-gamma 5, EMA. Lineage as it ran:
#    a. two stages on the first VAE (32 groups): 400 of 600 steps at 128 px, then 120 steps at 256 px
#       (their weights start the next stages; the latent space changes under them, so they are warm-up);
#    b. regroup to 8 groups, then on the final VAE's latents (cached; centre crops so the cache hits):
#       128 px buckets, then 256 px multi-aspect buckets with offset noise 0.05 (the paper's two stages).
base_common=(--set train.train_text_encoders=true --set loss.min_snr_gamma=5 --set loss.latent_sample=false
             --set ema.enabled=true)
sdxl train "${common[@]}" "${base_common[@]}" --output "$work/base0" --steps "$(steps 600)" --batch-size 32 \
    --resolution 128 --lr 1e-3 --set model.config="$here/configs/mini/base32.json" --set checkpoint.every=100 \
    --set model.vae="$work/vae2/vae.safetensors" --set train.stop_at="$(steps 400)" \
    --set optim.warmup_steps=50 --set optim.schedule=cosine --set optim.min_lr_ratio=0.2 --set ema.decay=0.99
sdxl train "${common[@]}" "${base_common[@]}" --output "$work/base0b" --steps "$(steps 120)" --batch-size 8 \
    --resolution 256 --lr 2e-4 --init "$work/base0/model.safetensors" --set loss.offset_noise=0.05 \
    --set model.vae="$work/vae2/vae.safetensors" --set ema.decay=0.98 --set checkpoint.every=100
python3 "$here/scripts/regroup.py" "$work/base0b/model.safetensors" "$work/base-g8.safetensors" --unet 8
cached=(--set model.vae="$vae" --set data.cache_latents=true --set data.crop=center)
sdxl train "${common[@]}" "${base_common[@]}" "${cached[@]}" --output "$work/base128-eps" --steps "$(steps 3000)" \
    --batch-size 32 --resolution 128 --lr 5e-4 --init "$work/base-g8.safetensors" --set checkpoint.every=250 \
    --set optim.warmup_steps=100 --set optim.schedule=cosine --set optim.min_lr_ratio=0.1 --set ema.decay=0.995 \
    --set train.stop_at="$(steps 614)"
#    c. eps-prediction left the samples ruled by the seed, not the caption (at high noise the eps target is
#       nearly the input itself, so the loss carries little about the image and less about its caption); the
#       run switched to v-prediction (`model.prediction = v`, recorded in the file: samplers read it), with
#       offset noise 0.05 from here on.
sdxl train "${common[@]}" "${base_common[@]}" "${cached[@]}" --output "$work/base128" --steps "$(steps ${BASE1_STEPS:-3000})" \
    --batch-size 32 --resolution 128 --lr 5e-4 --init "$work/base128-eps/model.safetensors" --seed 1 \
    --set model.prediction=v --set loss.offset_noise=0.05 --set checkpoint.every=250 \
    --set optim.warmup_steps=50 --set optim.schedule=cosine --set optim.min_lr_ratio=0.1 --set ema.decay=0.995
sdxl train "${common[@]}" "${base_common[@]}" "${cached[@]}" --output "$work/base256" --steps "$(steps ${BASE2_STEPS:-1200})" \
    --batch-size 16 --resolution 256 --lr 3e-4 --init "$work/base128/model.safetensors" --seed 0 \
    --set loss.offset_noise=0.05 --set checkpoint.every=100 --set optim.warmup_steps=20 \
    --set optim.schedule=cosine --set optim.min_lr_ratio=0.1 --set ema.decay=0.995
sdxl train "${common[@]}" "${base_common[@]}" "${cached[@]}" --output "$work/base" --steps "$(steps ${BASE3_STEPS:-1600})" \
    --batch-size 16 --resolution 256 --lr 2e-4 --init "$work/base256/model.safetensors" --seed 5 \
    --set loss.offset_noise=0.05 --set checkpoint.every=200 --set optim.warmup_steps=20 \
    --set optim.schedule=cosine --set optim.min_lr_ratio=0.1 --set ema.decay=0.995
#    d. zero terminal SNR: the standard schedule leaves 6.8% of the image in its last step, so the model read the
#       layout out of the noise's low frequencies and drew several blobs where one object was asked for. The
#       schedule is rescaled so t = 999 is pure noise (`model.zero_terminal_snr`, recorded in the file), and
#       min-SNR weights are clamped to [1, 5] (`loss.min_snr_floor`) so the noisy steps that decide the layout
#       train at all; no offset noise (pure noise at t = 999 already covers what it was for).
sdxl train "${common[@]}" "${base_common[@]}" "${cached[@]}" --output "$work/base-z" --steps "$(steps ${BASE4_STEPS:-4000})" \
    --batch-size 16 --resolution 256 --lr 2e-4 --init "$work/base/model.safetensors" --seed 7 \
    --set model.zero_terminal_snr=true --set loss.min_snr_floor=1 --set checkpoint.every=250 \
    --set optim.warmup_steps=50 --set optim.schedule=cosine --set optim.min_lr_ratio=0.1 --set ema.decay=0.995
#    e. masked loss (fourth session): the loss inside a disc around each object weighs 1 and outside 0.15
#       (`loss.masked`, `loss.mask_floor`; the masks are the NNNNNN.mask.png files `sdxl data shapes` writes), since
#       a flat background is ~95% of the pixels and the shape of an object ~0.5%; lr 3e-4, EMA 0.998, a 5000-step
#       cosine stopped (SIGTERM) at 4502. Object colours and relations rose, the object count fell (ABLATION.md).
sdxl train "${common[@]}" "${base_common[@]}" "${cached[@]}" --output "$work/base-m" --steps "$(steps ${BASE5_STEPS:-5000})" \
    --batch-size 16 --resolution 256 --lr 3e-4 --init "$work/base-z/model.safetensors" --seed 11 \
    --set model.zero_terminal_snr=true --set loss.min_snr_floor=1 --set loss.masked=true --set loss.mask_floor=0.15 \
    --set checkpoint.every=500 --set optim.warmup_steps=50 --set optim.schedule=cosine --set optim.min_lr_ratio=0.1 \
    --set ema.decay=0.998 --set train.stop_at="$(steps 4502)"
#    f. fifth session: the same images with "outline" masks (`sdxl data shapes --mask outline`: a band across each
#       object's edges weighs 1, the disc around it 0.47, the background 0.15) and logit-normal timesteps (SD3's
#       `loss.timestep_sampling`: half the steps in t = 333..666, where the shapes are decided); 4500 steps.
#       Object count, "all correct" and FD rose; shapes moved a little (ABLATION.md).
[ -f "$work/shapes-o/metadata.jsonl" ] || sdxl data shapes --n "$n_images" --out "$work/shapes-o" --seed 0 --mask outline
sdxl train "${common[@]}" "${base_common[@]}" "${cached[@]}" --data "$work/shapes-o" --output "$work/base-o" \
    --steps "$(steps ${BASE6_STEPS:-4500})" --batch-size 16 --resolution 256 --lr 3e-4 \
    --init "$work/base-m/model.safetensors" --seed 13 --set model.zero_terminal_snr=true --set loss.min_snr_floor=1 \
    --set loss.masked=true --set loss.mask_floor=0.15 --set loss.timestep_sampling=logit_normal \
    --set checkpoint.every=500 --set optim.warmup_steps=50 --set optim.schedule=cosine --set optim.min_lr_ratio=0.1 \
    --set ema.decay=0.998

# 4. refiner: its own small bigG-style tower and UNet, eps-prediction on the standard noise table. Lineage:
#    a. on the 200 lowest noise levels at 128 px, first on the first VAE, then regrouped and trained on the final
#       VAE's latents (first session);
sdxl train "${common[@]}" --output "$work/refiner0" --steps "$(steps 250)" --batch-size 16 --resolution 128 \
    --lr 1e-3 --set model.config="$here/configs/mini/refiner32.json" --set model.vae="$work/vae2/vae.safetensors" \
    --set train.train_text_encoders=true --set loss.latent_sample=false --set optim.warmup_steps=30 \
    --set optim.schedule=cosine --set ema.enabled=true --set ema.decay=0.99 --set checkpoint.every=100
python3 "$here/scripts/regroup.py" "$work/refiner0/model.safetensors" "$work/refiner-g8.safetensors" --unet 8
sdxl train "${common[@]}" "${cached[@]}" --output "$work/refiner" --steps "$(steps ${REFINER_STEPS:-800})" \
    --batch-size 16 --resolution 128 --lr 5e-4 --init "$work/refiner-g8.safetensors" \
    --set train.train_text_encoders=true --set loss.latent_sample=false --set optim.warmup_steps=30 \
    --set optim.schedule=cosine --set ema.enabled=true --set ema.decay=0.99 --set checkpoint.every=100
#    b. seventh session (ABLATION.md section 12): that refiner denoised real latents at the hand-off with twice
#       the base's error and speckled every image. Continued at 256 px (the size it refines) on t < 300 (the
#       hand-off from the zero-terminal-SNR base at switch 0.8 reaches t = 210 of the refiner's table, SDEdit at
#       strength 0.3 t = 299), on the scenes plus every tenth scene again with an empty caption and aesthetic
#       score 2.5: the unconditional branch the pipeline gives a refiner (its empty prompt encoded, the
#       negative aesthetic score 2.5; caption dropout would train zero text instead, so `data.ucg = 0`).
#       As it ran, it started from the shipped fp16 export of stage a (1 thread, 69 min).
python3 - "$work/shapes" <<'PY'
import json, sys
from pathlib import Path
folder = Path(sys.argv[1])
rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
with open(folder / "refiner.jsonl", "w") as f:
    for i, row in enumerate(rows):
        f.write(json.dumps(row) + "\n")
        if i % 10 == 0:
            f.write(json.dumps({**row, "caption": "", "aesthetic_score": 2.5}) + "\n")
PY
sdxl train "${common[@]}" "${cached[@]}" --data "$work/shapes/refiner.jsonl" --output "$work/refiner-r" \
    --steps "$(steps ${REFINER2_STEPS:-2000})" --batch-size 16 --resolution 256 --lr 3e-4 --seed 17 \
    --init "$work/refiner/model.safetensors" --set train.train_text_encoders=true --set loss.latent_sample=false \
    --set data.ucg=0 --set loss.timestep_max=300 --set optim.warmup_steps=30 --set optim.schedule=cosine \
    --set optim.min_lr_ratio=0.1 --set ema.enabled=true --set ema.decay=0.995 --set checkpoint.every=250

# 5. the final models carry the final VAE: the encoder they were trained on, with the decoder of step 2d
sdxl convert "$work/base-o/model.safetensors" "$work/base-final.safetensors" --vae "$decoder"
sdxl convert "$work/refiner-r/model.safetensors" "$work/refiner-final.safetensors" --vae "$decoder"

# 6. ship: fp16, official single-file layout (sdxl inspect reads them like any SDXL file)
mkdir -p "$work/ship"
sdxl convert "$work/base-final.safetensors" "$work/ship/base.safetensors" --dtype fp16
sdxl convert "$work/refiner-final.safetensors" "$work/ship/refiner.safetensors" --dtype fp16
echo "trained: $work/ship/base.safetensors $work/ship/refiner.safetensors"
