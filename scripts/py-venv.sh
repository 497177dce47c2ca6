#!/usr/bin/env bash
# Makes (once) the Python environment the tracking tests read furnace's output back with:
# target/py-venv with TensorBoard (its event file reader) and MLflow (a real tracking
# server). Idempotent and quick when it exists; the first install takes a minute or two.
# Never installs torch.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/py-venv
ready() {
    [ -x "$venv/bin/mlflow" ] && "$venv/bin/python" -c \
        "import importlib.util as u, sys; sys.exit(0 if u.find_spec('tensorboard') and u.find_spec('mlflow') else 1)" \
        >/dev/null 2>&1
}
if ready; then
    exit 0
fi
python=${FURNACE_PYTHON:-python3}
if ! command -v "$python" >/dev/null 2>&1; then
    echo "error: $python is needed for the tracking tests (python3 with venv and pip)" >&2
    exit 1
fi
mkdir -p target
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet "tensorboard==2.21.0" "mlflow==3.17.2"
ready || { echo "error: $venv has no tensorboard or mlflow after pip install" >&2; exit 1; }
