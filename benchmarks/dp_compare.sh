#!/usr/bin/env bash
# Data parallelism on this machine (issue 17): `kvrun serve` with one engine on THREADS
# threads (peer kvrun) against two engine cores of THREADS/2 threads each (peer
# kvrun-dp2, `--data-parallel-size 2`), same model, same `kvrun bench serve` workload.
#
#   bash benchmarks/dp_compare.sh
#   NUM_PROMPTS=8 MAX_TOKENS=16 bash benchmarks/dp_compare.sh     (smoke run)
#
# The workload defaults to the offline throughput workload's shape served over HTTP:
# 128 requests of up to 128 new tokens, 16 in flight (so each core of kvrun-dp2 has a
# batch of about 8). Everything else (PORT, THREADS=2, OUT, START_TIMEOUT_S, what
# passes through to the servers) is serve_compare.sh's; results go to OUT/summary.md.
# Run it on a quiet machine: the client shares the CPUs with the servers.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PEERS="${PEERS:-kvrun kvrun-dp2}"
export CONCURRENCY="${CONCURRENCY:-16}"
export NUM_PROMPTS="${NUM_PROMPTS:-128}"
export MAX_TOKENS="${MAX_TOKENS:-128}"
export OUT="${OUT:-$HERE/results/dp-$(date -u +%Y%m%d-%H%M%S)}"
exec bash "$HERE/serve_compare.sh"
