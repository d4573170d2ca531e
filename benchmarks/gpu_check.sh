#!/usr/bin/env bash
# Everything issue 6 asks of a real NVIDIA GPU, in as few device calls as possible:
#
#   tests   kvrun-cuda's tests compiled on the GPU (TRITON_INTERPRET unset): the Triton
#           kernels against the reference ops, FlashInfer / xFormers where installed,
#           graph capture and replay, memory profiling, the conformance kit.
#   bench   the GPU benchmark: SmolLM2-135M-shaped and 1B-class random-weight Llamas
#           (benchmarks/random_model.py: the real weights cannot travel there), kvrun
#           eager and with decode graphs against transformers, bf16, same card, same run.
#   tp      with two or more GPUs: TP=1 against TP=N (benchmarks/tp_check.py) on the
#           1B-class random Llama: float32 agreement, bf16 decode speed with the
#           custom all-reduce and with NCCL only; a one-GPU machine says so and skips.
#   all     tests and bench (the default; tp is its own call).
#
# Run it from the repository root on the device machine (see NOTES.md for the call):
#   bash benchmarks/gpu_check.sh [tests|bench|tp|all]
# It installs nothing from a network (there is none there): kvrun and kvrun-cuda are
# installed editable with --no-deps over the machine's own torch, triton and
# transformers. What it needs beside the tree, `make gpu-check-files` puts here in
# benchmarks/models/gpu-check (ignored by git), and the device call carries: SmolLM2's
# tokenizer and a setuptools wheel (for an editable install if the machine's is older
# than 70.1, which has no bdist_wheel of its own). Logs, reports and
# raw results go to $OUT (the device tool's folder; /tmp/kvrun-gpu-check elsewhere):
# at most 8 files, what the device tool brings back.
set -uo pipefail

stage=${1:-all}
case "$stage" in tests | bench | tp | all) ;; *)
    echo "usage: $0 [tests|bench|tp|all]" >&2
    exit 2
    ;;
esac
OUT=${OUT:-/tmp/kvrun-gpu-check}
PY=${PYTHON:-python3}
# Overridable for a dry run of the bench stage on a CPU machine (PEERS=kvrun,hf BASELINE=hf).
PRESETS=${PRESETS:-smollm2-135m llama-1b}
PEERS=${PEERS:-kvrun-cuda,kvrun-cuda-graphs,hf-cuda}
BASELINE=${BASELINE:-hf-cuda}
REPEATS=${REPEATS:-3}
FILES=benchmarks/models/gpu-check
TOKENIZER=$FILES/tokenizer
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name(0))'
} 2>&1 | tee "$OUT/machine.txt"

install() {
    "$PY" -m pip install --no-deps --no-build-isolation --no-index -q -e . -e plugins/cuda \
        >>/tmp/kvrun-install.log 2>&1
}
if ! "$PY" -c 'import kvrun_cuda' 2>/dev/null; then
    if ! install; then
        "$PY" -m pip install --no-index --find-links "$FILES/wheels" -q "setuptools>=70.1" \
            >>/tmp/kvrun-install.log 2>&1
        install || {
            echo "install failed:" >&2
            tail -20 /tmp/kvrun-install.log >&2
            exit 1
        }
    fi
fi

status=0
if [[ $stage == tests || $stage == all ]]; then
    # -W default: the suite turns warnings into errors, and this machine's torch and
    # triton are other versions than the ones those filters were written against.
    # -m gpu: the tests that need the GPU (CI runs the rest, the interpreter's, on CPU).
    timeout 480 "$PY" -m pytest plugins/cuda/tests -m gpu -q -ra -W default -p no:cacheprovider \
        2>&1 | tee "$OUT/gpu-tests.log" | tail -40
    status=${PIPESTATUS[0]}
fi

if [[ $stage == bench || $stage == all ]]; then
    if [[ ! -f $TOKENIZER/tokenizer.json ]]; then
        echo "$TOKENIZER is missing: run 'make gpu-check-files' and carry $FILES" >&2
        exit 1
    fi
    models=/tmp/kvrun-gpu-models
    for preset in $PRESETS; do
        "$PY" benchmarks/random_model.py --preset "$preset" --tokenizer "$TOKENIZER" \
            --out "$models/$preset" >/dev/null || exit 1
        "$PY" benchmarks/run.py --python "$PY" --model "$models/$preset" \
            --workload latency,throughput --peers "$PEERS" \
            --baseline "$BASELINE" --reference "$BASELINE" --repeats "$REPEATS" --timeout 600 \
            >"$OUT/bench-$preset.md" 2>"$OUT/bench-$preset.log"
        cat "$OUT/bench-$preset.md"
        latest=$(ls -td benchmarks/results/*/ | head -1)
        cp "$latest/results.json" "$OUT/bench-$preset.json"
    done
fi
if [[ $stage == tp ]]; then
    gpus=$(nvidia-smi --list-gpus | wc -l)
    if ((gpus < 2)); then
        echo "tp: skipped: this machine has $gpus GPU(s); TP=N needs two or more" | tee "$OUT/tp.md"
    else
        "$PY" benchmarks/random_model.py --preset llama-1b --tokenizer "$TOKENIZER" \
            --out /tmp/kvrun-gpu-models/llama-1b >/dev/null || exit 1
        tp=$((gpus >= 4 ? 4 : 2))
        timeout 540 "$PY" benchmarks/tp_check.py --model /tmp/kvrun-gpu-models/llama-1b \
            --tp "$tp" --out "$OUT/tp.md" 2>"$OUT/tp.log"
        status=$?
        cat "$OUT/tp.md"
    fi
fi
exit "$status"
