#!/usr/bin/env bash
# Makes (once) the Python environment the tests check furnace against real clients with:
# target/py-venv with TensorBoard (its event file reader), MLflow (a real tracking server)
# and the official OpenAI client (against `furnace serve`). Idempotent and quick when it exists; the first install takes a minute or two.
# Never installs torch.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/py-venv
ready() {
    [ -x "$venv/bin/mlflow" ] && "$venv/bin/python" -c \
        "import importlib.util as u, sys; sys.exit(0 if u.find_spec('tensorboard') and u.find_spec('mlflow') and u.find_spec('openai') else 1)" \
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
[ -x "$venv/bin/pip" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install --quiet "tensorboard==2.21.0" "mlflow==3.17.2" "openai==3.57.0"
ready || { echo "error: $venv has no tensorboard, mlflow or openai after pip install" >&2; exit 1; }
