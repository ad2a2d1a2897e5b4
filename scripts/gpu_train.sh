#!/usr/bin/env bash
# Continue training the shipped miniature base on one GPU, in a single device call, and score it.
#
# Sized for a 15-minute device lease (one command of at most 10 minutes). From a session that has a GPU:
#   1. here, once (the device image has torch, numpy, Pillow, regex, rich, safetensors and typer, not ftfy):
#        python3 -m pip download --no-deps --only-binary=:all: -d .whl ftfy==6.3.1 wcwidth==0.2.13
#      (.whl/ is git-ignored)
#   2. device run: command="bash scripts/gpu_train.sh", carry=[".whl"], timeout_s=600
#   3. what comes back under $OUT: base.safetensors (fp16, official layout: copy it over
#      src/sdxl/assets/default/base.safetensors if the scores beat the shipped ones), eval.json
#      (`sdxl eval shapes --n 30 --json`), train.log, log.jsonl, env.txt.
#
# What it does:
#   1. renders N_IMAGES new scenes of the shapes dataset, one shard per CPU core (seeds 1000 + shard, so the
#      shards differ from each other and from the 6000 of the CPU recipe; outline loss masks);
#   2. continues the shipped base (the CPU recipe's last stage: v-prediction, zero terminal SNR, outline
#      masked loss, logit-normal timesteps) in bf16 at batch BATCH for TRAIN_SECONDS, then stops it with
#      SIGTERM, on which the trainer finishes its step and saves (EMA weights);
#   3. exports fp16 and runs the evaluator on the GPU.
# On the CPU (DEVICE=cpu, tiny N_IMAGES / BATCH / TRAIN_SECONDS) the same script is the smoke test of itself.
#
# Knobs (environment): TRAIN_SECONDS (300), N_IMAGES (32000), BATCH (128), LR (4e-4), LOC (0.5, the mean of
# the logit-normal timestep density), DEVICE (cuda), PRECISION (bf16), WORKERS (10), EVAL_N (30), WORK.
set -uo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$PWD/gpu_out}"
WORK="${WORK:-/tmp/sdxl_gpu_train}"
TRAIN_SECONDS="${TRAIN_SECONDS:-300}"
N_IMAGES="${N_IMAGES:-32000}"
BATCH="${BATCH:-128}"
LR="${LR:-4e-4}"
LOC="${LOC:-0.5}"
DEVICE="${DEVICE:-cuda}"
PRECISION="${PRECISION:-bf16}"
WORKERS="${WORKERS:-10}"
EVAL_N="${EVAL_N:-30}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
stamp() { echo "[$(($(date +%s) - start)) s] $*"; }

{
    date -u
    nvidia-smi 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if ! "$PY" -c "import ftfy" 2>/dev/null; then
    ls "$here"/.whl/*.whl > /dev/null 2>&1 || { echo "ftfy is missing and no .whl/ was carried (step 1 above)"; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$here"/.whl/*.whl \
        || exit 2
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
sdxl() { "$PY" -m sdxl "$@"; }

# 1. data, one shard per core
shards=$(nproc --all)  # (plain nproc follows OMP_NUM_THREADS)
per=$(( (N_IMAGES + shards - 1) / shards ))
stamp "rendering $((per * shards)) scenes in $shards shards"
pids=()
for s in $(seq 0 $((shards - 1))); do
    [ -f "$WORK/shards/$s/metadata.jsonl" ] && continue
    sdxl data shapes --n "$per" --out "$WORK/shards/$s" --seed $((1000 + s)) --mask outline > /dev/null &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || { echo "data shard failed"; exit 1; }; done
"$PY" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
with open(work / "all.jsonl", "w") as out:
    for manifest in sorted((work / "shards").glob("*/metadata.jsonl")):
        for line in manifest.read_text().splitlines():
            entry = json.loads(line)
            for key in ("path", "mask"):  # relative to the shard: make them absolute for the merged manifest
                if key in entry:
                    entry[key] = str(manifest.parent / entry[key])
            out.write(json.dumps(entry) + "\n")
EOF
stamp "data ready: $(wc -l < "$WORK/all.jsonl") images"

# 2. train for TRAIN_SECONDS, then SIGTERM to the trainer alone (it finishes the step, stops its data workers,
#    saves and exits 0; `timeout` would signal the workers too, which the DataLoader reports as a crash)
rm -rf "$WORK/run"
"$PY" -m sdxl.train --data "$WORK/all.jsonl" --output "$WORK/run" \
    --init "$here/src/sdxl/assets/default/base.safetensors" --device "$DEVICE" --mixed-precision "$PRECISION" \
    --batch-size "$BATCH" --resolution 256 --lr "$LR" --steps 1000000 --seed 21 \
    --set data.bucket_step=32 --set data.crop=center --set data.num_workers="$WORKERS" --set train.progress=false \
    --set train.train_text_encoders=true --set loss.min_snr_gamma=5 --set loss.latent_sample=false \
    --set model.zero_terminal_snr=true --set loss.min_snr_floor=1 --set loss.masked=true --set loss.mask_floor=0.15 \
    --set loss.timestep_sampling=logit_normal --set loss.timestep_loc="$LOC" \
    --set optim.warmup_steps=100 --set optim.schedule=constant \
    --set ema.enabled=true --set ema.decay=0.998 --set checkpoint.every=1000000 > "$OUT/train.log" 2>&1 &
trainer=$!
( sleep "$TRAIN_SECONDS"; kill -TERM "$trainer" 2>/dev/null; sleep 120; kill -KILL "$trainer" 2>/dev/null ) &
stopper=$!
wait "$trainer"
rc=$?
kill "$stopper" 2>/dev/null
cp "$WORK/run/log.jsonl" "$OUT/log.jsonl" 2>/dev/null
tail -n 3 "$OUT/train.log"
[ -f "$WORK/run/model.safetensors" ] || { echo "training saved no model (exit $rc)"; exit 1; }
stamp "trained: $(tail -n 1 "$WORK/run/log.jsonl" | cut -c1-200)"

# 3. export fp16 (official layout) and score
sdxl convert "$WORK/run/model.safetensors" "$OUT/base.safetensors" --dtype fp16 > /dev/null || exit 1
sdxl eval shapes --model "$OUT/base.safetensors" --n "$EVAL_N" --device "$DEVICE" --json > "$OUT/eval.json" \
    2> "$OUT/eval.err" || { tail -n 5 "$OUT/eval.err"; exit 1; }
"$PY" - "$OUT/eval.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["results"]:
    print(f"{r['kind']:13s} all {r['all_ok']:.0%} colour {r['colour_ok']:.0%} shape {r['shape_ok']:.0%} "
          f"count {r['count_ok']:.0%} relation {r['relation_ok']:.0%} FD {r['fd']:.2f}")
EOF
stamp "done"
