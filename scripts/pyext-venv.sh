#!/usr/bin/env bash
# Builds the furnace Python package (python/, the native module crates/furnace-py) with
# maturin and installs it into target/pyext-venv, with what its tests need: pytest,
# pandas, and Jupyter's nbconvert + ipykernel for the example notebook. The virtualenv is
# made once (cached); the wheel is rebuilt each time, incrementally, in cargo's target
# folder (the dev profile the tests use, stripped). Never installs torch.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/pyext-venv
python=${FURNACE_PYTHON:-python3}
ready() {
    "$venv/bin/python" -c \
        "import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in ('maturin', 'pytest', 'pandas', 'nbconvert', 'ipykernel', 'nbformat')) else 1)" \
        >/dev/null 2>&1
}
if ! ready; then
    if ! command -v "$python" >/dev/null 2>&1; then
        echo "error: $python is needed for the Python package's tests (python3 with venv and pip)" >&2
        exit 1
    fi
    mkdir -p target
    [ -x "$venv/bin/pip" ] || "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet "maturin==1.16.0" "pytest==9.2.0" "pandas==2.3.3" \
        "nbconvert==7.17.2" "nbformat==5.10.4" "ipykernel==7.4.0"
    ready || { echo "error: $venv lacks maturin, pytest, pandas or Jupyter after pip install" >&2; exit 1; }
fi
# The wheel: built where cargo builds the workspace (only the native module links anew).
root=$(pwd)
target_dir=$(cd "$root" && realpath -m "${CARGO_TARGET_DIR:-target}")
rm -rf target/wheels
(cd python && "$root/$venv/bin/maturin" build --quiet --profile dev --strip \
    --interpreter "$root/$venv/bin/python" --target-dir "$target_dir" --out "$root/target/wheels")
"$venv/bin/pip" install --quiet --force-reinstall --no-deps target/wheels/furnace-*.whl
"$venv/bin/python" -c "import furnace; print('furnace', furnace.__version__, 'installed in $venv')"
