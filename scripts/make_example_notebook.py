# Writes examples/python/sft_tutorial.ipynb (the Python package's tutorial notebook) from these cells;
# run from the repository root with a Python that has nbformat (target/pyext-venv).
import nbformat as nbf
nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
md("""# SFT with furnace from a notebook

This notebook follows RapidFire AI's SFT tutorial step by step, on furnace: load a dataset,
write a formatting function and a metrics function, describe several configurations with
`List` knobs, train them all at once with `run_fit` (chunk by chunk, compared live), look at
the results as DataFrames, steer a run with an IC op, and end the experiment.

The task is furnace's shipped extraction data: a sentence about a person becomes
`{"name", "age", "job", "city"}` as compact JSON. The model is SmolLM2-135M-Instruct, which
furnace fetches into its cache on first use (set `FURNACE_NOTEBOOK_MODEL` to another alias,
a `.gguf` file or an HF folder)."""),
code("""import json
import os

import pandas as pd

from furnace import Experiment
from furnace.automl import List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig

MODEL = os.environ.get("FURNACE_NOTEBOOK_MODEL", "smollm2-135m-instruct")
ROWS = int(os.environ.get("FURNACE_NOTEBOOK_ROWS", "48"))
EXPERIMENTS = os.environ.get("FURNACE_EXPERIMENTS", "furnace_experiments")"""),
md("## Load the dataset\n\nAny list of dicts, pandas DataFrame or Hugging Face `datasets.Dataset` works."),
code("""train_dataset = pd.read_json("../../data/extract/train.jsonl", lines=True).head(ROWS)
eval_dataset = pd.read_json("../../data/extract/eval.jsonl", lines=True).head(8)
train_dataset.head(3)"""),
md("""## Formatting and metrics functions

Plain Python, called by furnace's engine in batches: the formatting function turns one row
into a conversation, the metrics function scores the model's answers on the eval set at
every chunk boundary. An exception in either fails only the run that uses it, with its
traceback in `get_runs_info()`."""),
code("""def sample_formatting_function(row):
    return {
        "prompt": [
            {"role": "system", "content": row["system"]},
            {"role": "user", "content": row["prompt"]},
        ],
        "completion": [{"role": "assistant", "content": row["completion"]}],
    }


def sample_compute_metrics(eval_preds):
    predictions, labels = eval_preds
    def parsed(text):
        try:
            return json.loads(text)
        except ValueError:
            return None
    exact = sum(p.strip() == l.strip() for p, l in zip(predictions, labels))
    valid = sum(parsed(p) is not None for p in predictions)
    return {"exact_match": exact / len(labels), "valid_json": valid / len(labels)}"""),
md("## Configurations\n\nTwo learning rates times two LoRA ranks: four runs that train together on one frozen base."),
code("""peft_configs = RFLoraConfig(r=List([8, 16]), lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])

config_set = {
    "model_config": RFModelConfig(
        model_name=MODEL,
        peft_config=peft_configs,
        training_args=RFSFTConfig(
            learning_rate=List([1e-3, 3e-4]),
            lr_scheduler_type="linear",
            per_device_train_batch_size=4,
            num_train_epochs=1,
            max_length=128,
            logging_steps=1,
        ),
        model_kwargs={"quantize": "bf16"},
        formatting_func=sample_formatting_function,
        compute_metrics=sample_compute_metrics,
        generation_config={"max_new_tokens": 32},
    )
}
config_group = RFGridSearch(configs=config_set, trainer_type="SFT")"""),
md("""## Create the experiment and train

`run_fit` blocks while the runs train and shows a live table; interrupting the kernel stops
cleanly, and running the cell again continues from the checkpoints."""),
code("""experiment = Experiment(experiment_name="extract-sft", mode="fit", experiments_path=EXPERIMENTS)
experiment.run_fit(config_group, train_dataset=train_dataset, eval_dataset=eval_dataset, num_chunks=4, seed=42)"""),
md("## Results"),
code("""runs = experiment.get_runs_info()
runs[["run_id", "status", "lora.r", "trainer.learning_rate", "steps_done", "error"]]"""),
code("""results = experiment.get_results()
final = results.dropna(subset=["eval_loss"]).groupby("run_id").last()
final[["step", "eval_loss", "eval_exact_match", "eval_valid_json"]]"""),
md("""## IC ops: clone the best run, one more epoch at a lower learning rate

A warm clone continues from its parent's adapter, optimizer and data position; `stop`,
`resume` and `delete` work the same way (and so do the live table's buttons, with
`Experiment(..., dashboard=True)`)."""),
code("""best = int(final["eval_loss"].idxmin())
experiment.clone(best, {"trainer.learning_rate": 1e-4, "trainer.epochs": 2}, warm=True)
experiment.resume_experiment()
experiment.get_runs_info()[["run_id", "parent_id", "status", "trainer.learning_rate"]]"""),
code("""clone = experiment.get_runs_info().iloc[-1]
assert clone["parent_id"] == best and clone["status"] == "completed", clone
assert experiment.get_results()["eval_exact_match"].notna().any()"""),
md("## End"),
code("""experiment.end()"""),
]
nb["cells"] = cells
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, "examples/python/sft_tutorial.ipynb")
