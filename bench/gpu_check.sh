#!/usr/bin/env bash
# The whole GPU check in one call, sized for a 15-minute lease (one command of at most 10 minutes).
#
# From a session that has a GPU (see bench/RESULTS.md, "Running the GPU check"):
#   1. here, once:  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                     --implementation cp --platform manylinux2014_x86_64 --platform any \
#                     -d .whl diffusers==0.42.1 importlib_metadata
#      (.whl/ is git-ignored; the device image has torch, transformers, safetensors and triton but no diffusers)
#   2. device run:  command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600
#
# What it does, in order (each step appends to $OUT as it goes, so a cut-short run still returns data):
#   - nvidia-smi and versions                                             -> $OUT/env.txt
#   - the GPU-only unit test (CUDA-graph replay of a tiny UNet)           -> $OUT/pytest.log
#   - the benchmark (bench/bench.py, all GPU modes, --budget-s so optional compiles are skipped rather
#     than overrunning)                                                   -> $OUT/bench.log, bench.jsonl,
#                                                                            RESULTS_gpu.md
# Copy the section of $OUT/RESULTS_gpu.md into bench/RESULTS.md afterwards.
#
# Environment knobs: GPU_CHECK_BUDGET (seconds for everything, default 520), BENCH_ARGS (extra arguments,
# e.g. "--compile-diffusers" or "--components unet,compile,fp8").
set -uo pipefail

OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
START=$(date +%s)
BUDGET_TOTAL="${GPU_CHECK_BUDGET:-520}"

{
    date -u
    nvidia-smi || true
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0))"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# diffusers is not in the device image: install the carried wheels (no network there)
if ! "$PY" -c "import diffusers" 2>/dev/null; then
    if ls .whl/*.whl > /dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tee -a "$OUT/env.txt" \
    || echo "diffusers is not importable: the benchmark runs our models only" | tee -a "$OUT/env.txt"

# the unit test that needs a GPU (a few seconds)
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_fast_paths.py -k "cuda_graph" 2>&1 | tee "$OUT/pytest.log"

# the benchmark, within what is left of the budget
ELAPSED=$(( $(date +%s) - START ))
BUDGET=$(( BUDGET_TOTAL - ELAPSED ))
# SIGINT at the hard limit: the benchmark stops the current step and still writes its table
timeout -s INT $(( BUDGET + 45 )) "$PY" bench/bench.py --budget-s "$BUDGET" --cache-dir /tmp/sdxl-inductor \
    --results "$OUT/RESULTS_gpu.md" --json "$OUT/bench.jsonl" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
status=${PIPESTATUS[0]}

if [ ! -s "$OUT/RESULTS_gpu.md" ] && [ -s "$OUT/bench.jsonl" ]; then
    "$PY" bench/bench.py --from-json "$OUT/bench.jsonl" --device cuda --results "$OUT/RESULTS_gpu.md" > /dev/null
fi
echo "gpu_check: benchmark exit $status after $(( $(date +%s) - START )) s; results in $OUT"
exit "$status"
