#!/usr/bin/env bash
# Curriculum stage 4 (docs/CURRICULUM.md): a refiner on the new latents (configs/mini/refiner.json, from scratch),
# t < 300, 10% of the scenes again with an empty caption and aesthetic score 2.5 (the pipeline's unconditional
# branch for a refiner), then the base alone and base + refiner scored on the same prompts and seeds. Gate: the
# refiner improves the base (lower FD, no accuracy lower than the base's).
#
#   bash scripts/stage4_refiner.sh WORK [VAE]
#
# The refiner trains on the `multi` level's data alone, so it can run beside stages 1-3; the comparison needs a
# base: BASE (default WORK/stage3/model.safetensors). Without one the script trains and stops; run it again
# once the base exists (the finished training is resumed as done and only the comparison runs).
# Env: N (12000, the stage-3 data), STEPS (3000 x BATCH 16), LR (5e-4), BASE, LISTS (single,pair).
source "$(dirname "$0")/stage_common.sh"
work=${1:?usage: stage4_refiner.sh WORK [VAE]}
vae=${2:-$work/vae/vae.safetensors}
[ -f "$vae" ] || vae=$shipped
base=${BASE:-$work/stage3/model.safetensors}
[ -f "$work/data-multi/metadata.jsonl" ] || sdxl data shapes --level multi --n "${N:-12000}" --out "$work/data-multi" --seed 3
python3 - "$work/data-multi" <<'PY'
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
sdxl train --data "$work/data-multi/refiner.jsonl" --output "$work/refiner" --steps "${STEPS:-3000}" --batch-size "${BATCH:-16}" \
    --resolution 256 --lr "${LR:-5e-4}" --seed 4 --set model.config="$here/configs/mini/refiner.json" \
    --set model.vae="$vae" --set data.bucket_step=32 --set data.cache_latents=true --set data.cache_dir="$work/cache" --set data.crop=center \
    --set data.ucg=0 --set train.train_text_encoders=true --set train.progress=false --set loss.latent_sample=false \
    --set loss.timestep_max=300 --set optim.warmup_steps=30 --set optim.schedule=cosine --set optim.min_lr_ratio=0.1 \
    --set ema.enabled=true --set ema.decay=0.995 --set checkpoint.every=500 --resume
[ -f "$base" ] || { stamp "refiner trained: $work/refiner/model.safetensors; no base at $base to compare with (set BASE)"; exit 0; }
lists=${LISTS:-single,pair}
sdxl eval shapes --model "$base" --lists "$lists" --n "$EVAL_N" --detector-check 0 --json > "$work/refiner/eval-base.json"
sdxl eval shapes --model "$base" --refiner "$work/refiner/model.safetensors" --lists "$lists" --n "$EVAL_N" \
    --detector-check 0 --json > "$work/refiner/eval-refined.json"
python3 - "$work/refiner/eval-base.json" "$work/refiner/eval-refined.json" <<'PY'
import json, sys
a, b = ({r["kind"]: r for r in json.load(open(p))["results"]} for p in sys.argv[1:3])
ok = True
for kind in a:
    for m in ("all_ok", "shape_ok", "count_ok", "fd"):
        print(f"{kind} {m}: base {a[kind][m]:.3f} -> refined {b[kind][m]:.3f}")
    ok = ok and b[kind]["fd"] < a[kind]["fd"] and all(b[kind][m] >= a[kind][m] for m in ("all_ok", "shape_ok"))
print("gate:", "met" if ok else "NOT met")
sys.exit(0 if ok else 1)
PY
