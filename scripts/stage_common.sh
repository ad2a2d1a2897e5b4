# Shared settings of the curriculum stages (docs/CURRICULUM.md), sourced by scripts/stage*.sh.
# One thread per run (two runs may share the 2-core machine); every knob can be overridden from the environment.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1} OMP_WAIT_POLICY=PASSIVE
export PYTHONUNBUFFERED=1
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
shipped="$here/src/sdxl/assets/default/base.safetensors"
EVAL_N=${EVAL_N:-100}      # prompts per list of every gate evaluation (claims need >= 100)
WATCH_N=${WATCH_N:-16}     # prompts per list of the small evaluation logged during training
WATCH_EVERY=${WATCH_EVERY:-250}
CHUNK=${CHUNK:-500}        # optimizer steps between gate evaluations; the stage stops once its gate is met
# The shipped base's recipe settings, as the easy-shapes experiment ran them (v-prediction, zero terminal SNR,
# min-SNR in [1, 5], logit-normal t, 10% caption dropout (the default), EMA 0.995, both text towers trained)
recipe=(--set model.prediction=v --set model.zero_terminal_snr=true --set data.bucket_step=32
        --set data.cache_latents=true --set data.crop=center --set train.train_text_encoders=true
        --set train.progress=false --set loss.min_snr_gamma=5 --set loss.min_snr_floor=1
        --set loss.latent_sample=false --set loss.timestep_sampling=logit_normal --set optim.warmup_steps=50
        --set optim.schedule=cosine --set optim.min_lr_ratio=0.1 --set ema.enabled=true --set ema.decay=0.995)
# The watch evaluation (log.jsonl: eval_<list>_<metric> with _lo/_hi), sampled as `sdxl eval shapes` samples
watch=(--set validation.every="$WATCH_EVERY" --set validation.shapes_n="$WATCH_N" --set sample.steps=20
       --set sample.cfg=5.0 --set sample.sampler=dpmpp_2m --set sample.schedule=automatic)

stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }

# train_until_gate OUT TOTAL_STEPS "EVAL ARGS" "GATE CONDITIONS" -- TRAIN ARGS...
# Trains in chunks of $CHUNK steps (one cosine schedule over TOTAL_STEPS, resumed from the checkpoint), scores
# the export after each chunk with `sdxl eval shapes $EVAL_ARGS --n $EVAL_N --json` and stops once the gate holds.
# Run again, it skips the chunks already scored; the stages of one WORK share one latent cache (WORK/cache).
train_until_gate() {
    local out=$1 total=$2 eval_args=$3 gate=$4
    shift 5
    local stop=0
    while [ "$stop" -lt "$total" ]; do
        stop=$(( stop + CHUNK )); [ "$stop" -gt "$total" ] && stop=$total
        if [ ! -s "$out/eval-$stop.json" ]; then   # a chunk already trained and scored is not run again
            stamp "train $out to step $stop of $total"
            sdxl train "$@" --output "$out" --steps "$total" --set train.stop_at="$stop" \
                --set checkpoint.every="$CHUNK" --set data.cache_dir="$(dirname "$out")/cache" --resume
            # shellcheck disable=SC2086
            sdxl eval shapes --model "$out/model.safetensors" $eval_args --n "$EVAL_N" --detector-check 0 --json \
                > "$out/eval-$stop.json.part" && mv "$out/eval-$stop.json.part" "$out/eval-$stop.json"
        fi
        # shellcheck disable=SC2086
        if python3 "$here/scripts/stage_gate.py" "$out/eval-$stop.json" $gate | tee "$out/gate-$stop.txt"; then
            stamp "gate met at step $stop: $out/eval-$stop.json"
            return 0
        fi
    done
    stamp "gate NOT met after $total steps: see $out/gate-$total.txt"
    return 1
}
