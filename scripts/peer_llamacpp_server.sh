#!/usr/bin/env bash
# The peer for `furnace bench serve`: llama.cpp's OpenAI-compatible server (llama-cpp-python's
# `llama_cpp.server`) on the same GGUF that `furnace serve` serves by default.
#
#   scripts/peer_llamacpp_server.sh install          # once: venv + build llama.cpp (~13 min on 2 busy cores)
#   scripts/peer_llamacpp_server.sh serve [PORT]     # foreground server on 127.0.0.1:PORT (default 8081)
#
# Environment: MODEL (the .gguf; default: the smollm2-135m-instruct GGUF in ~/.cache/furnace/models),
# THREADS (default 2), N_CTX (default 2048: one sequence at a time, prompt + generation).
# llama_cpp.server decodes one request at a time (a lock around its single Llama); concurrent requests
# wait in line. `--interrupt_requests False` keeps a new request from cancelling the stream in progress,
# so every request of the benchmark runs to the end.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.3.36
venv=target/peer-llamacpp
ready() { "$venv/bin/python" -c "import llama_cpp, llama_cpp.server, uvicorn" >/dev/null 2>&1; }

install() {
    if ready; then return 0; fi
    mkdir -p target
    [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
    # Builds llama.cpp from source (CPU, native). CMAKE_BUILD_PARALLEL_LEVEL bounds the compile jobs.
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
        nice -n 10 "$venv/bin/pip" install --no-cache-dir "llama-cpp-python[server]==$VERSION"
    ready || { echo "error: $venv has no llama_cpp.server after pip install" >&2; exit 1; }
}

default_model() {
    ls "$HOME"/.cache/furnace/models/smollm2-135m-instruct/*.gguf 2>/dev/null | head -n 1
}

case "${1:-}" in
    install) install ;;
    serve)
        install
        port=${2:-8081}
        model=${MODEL:-$(default_model)}
        [ -f "$model" ] || { echo "error: no GGUF (set MODEL=FILE)" >&2; exit 1; }
        exec "$venv/bin/python" -m llama_cpp.server --model "$model" \
            --model_alias smollm2-135m-instruct \
            --n_threads "${THREADS:-2}" --n_threads_batch "${THREADS:-2}" \
            --n_ctx "${N_CTX:-2048}" --n_batch 512 \
            --interrupt_requests False --verbose False \
            --host 127.0.0.1 --port "$port"
        ;;
    *) echo "usage: $0 install | serve [PORT]" >&2; exit 2 ;;
esac
