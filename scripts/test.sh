#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: builds, fetches the default model
# into the furnace cache (the real-model tests fail loudly without it), then tests: the
# Rust workspace, then the Python package (python/tests).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo is not installed; install Rust (rustup) and run this again" >&2
    exit 1
fi
if ! command -v python3 >/dev/null 2>&1; then
    echo "error: python3 with pip is needed to fetch the default model (furnace model pull)" >&2
    exit 1
fi

cargo build --workspace --all-targets --locked
./target/debug/furnace model pull smollm2-135m-instruct
./target/debug/furnace model pull all-minilm-l6-v2
# TensorBoard and MLflow, which the tracking tests read furnace's output back with (cached).
./scripts/py-venv.sh
# llama-cpp-python, which the GGUF export tests load furnace's exported files with (cached).
./scripts/llamacpp-venv.sh
# Headless Chromium and chromedriver, which the dashboard's browser tests drive.
./scripts/browser.sh
cargo test --workspace --locked "$@"
# The Python package: its wheel built with maturin into a cached virtualenv (pytest,
# pandas, Jupyter), then its tests: fit and evals from Python, user functions, IC ops, the
# tutorial notebook under `jupyter nbconvert --execute`.
./scripts/pyext-venv.sh
target/pyext-venv/bin/python -m pytest -q python/tests
