#!/usr/bin/env bash
# Makes (once) target/llamacpp-venv with llama-cpp-python, which the GGUF export tests load
# furnace's exported files with (llama.cpp's own loader and greedy decoding). The first
# install builds llama.cpp from source (CPU only; several minutes on 2 cores); later runs are
# instant. Never installs torch.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.3.36
venv=target/llamacpp-venv
ready() { "$venv/bin/python" -c "import llama_cpp" >/dev/null 2>&1; }
if ready; then
    exit 0
fi
python=${FURNACE_PYTHON:-python3}
if ! command -v "$python" >/dev/null 2>&1; then
    echo "error: $python is needed for the GGUF export tests (python3 with venv and pip)" >&2
    exit 1
fi
if ! command -v cmake >/dev/null 2>&1 && ! "$python" -c "import cmake" >/dev/null 2>&1; then
    echo "note: no cmake on PATH; pip builds llama-cpp-python with the cmake wheel it fetches" >&2
fi
mkdir -p target
[ -x "$venv/bin/pip" ] || "$python" -m venv "$venv"
# CPU only, no examples, tools or tests of llama.cpp: only the library the binding loads.
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF}" \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
    "$venv/bin/pip" install --quiet --no-cache-dir "llama-cpp-python==$VERSION"
ready || { echo "error: $venv has no llama_cpp after pip install" >&2; exit 1; }
