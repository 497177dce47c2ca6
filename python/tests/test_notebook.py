"""The tutorial notebook (examples/python/sft_tutorial.ipynb) runs top to bottom under
``jupyter nbconvert --execute``, in a kernel of this environment, on the real default model."""

import os
import subprocess
import sys

import nbformat


def test_sft_tutorial_notebook_runs_top_to_bottom(root, tmp_path):
    nb = root / "examples" / "python" / "sft_tutorial.ipynb"
    out = tmp_path / "executed.ipynb"
    env = dict(os.environ)
    env["FURNACE_EXPERIMENTS"] = str(tmp_path / "experiments")
    env.setdefault("FURNACE_NOTEBOOK_ROWS", "24")
    cmd = [
        sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", str(nb),
        "--output", str(out), "--ExecutePreprocessor.timeout=1200", "--ExecutePreprocessor.kernel_name=python3",
    ]
    # The notebook's relative data paths are relative to its own folder, as in Jupyter.
    r = subprocess.run(cmd, cwd=nb.parent, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-8000:]
    executed = nbformat.read(str(out), as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    # The results cell shows every run's metrics computed by the notebook's own function.
    text = "".join(o.get("data", {}).get("text/plain", "") for c in executed.cells for o in c.get("outputs", []) if c.cell_type == "code")
    assert "eval_exact_match" in text and "valid_json" in text
