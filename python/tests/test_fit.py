"""run_fit from Python on the tiny model: configs, knobs, datasets, DataFrames, and each
kind of fit user function (formatting, metrics, GRPO rewards), failing only its run."""

import pandas as pd
import pytest

import furnace
from furnace import Experiment
from furnace.automl import List, Range, RFGridSearch, RFGRPOConfig, RFLoraConfig, RFModelConfig, RFRandomSearch, RFSFTConfig


def sft_config(model, **kw):
    args = dict(learning_rate=1e-3, per_device_train_batch_size=4, max_length=64, num_train_epochs=1)
    args.update(kw.pop("training_args", {}))
    return RFModelConfig(
        model_name=model,
        peft_config=kw.pop("peft_config", RFLoraConfig(r=4, lora_alpha=8)),
        training_args=RFSFTConfig(**args),
        **kw,
    )


def test_grid_of_two_configs_trains_both_and_reports_dataframes(tiny_model, extract_rows, exp_dir):
    train, ev = extract_rows
    group = RFGridSearch(
        {"model_config": sft_config(tiny_model, peft_config=RFLoraConfig(r=List([2, 4]), lora_alpha=8))}, trainer_type="SFT"
    )
    exp = Experiment("grid", mode="fit", experiments_path=exp_dir)
    info = exp.run_fit(group, train_dataset=pd.DataFrame(train), eval_dataset=ev, num_chunks=2, seed=7)
    assert exp.name == "grid"
    for col in ["run_id", "status", "steps_done", "total_steps", "chunks_done", "total_chunks", "parent_id", "error", "knobs", "config", "lora.r"]:
        assert col in info.columns, (col, list(info.columns))
    assert sorted(info["lora.r"]) == [2, 4]
    assert list(info["status"]) == ["completed", "completed"]
    res = exp.get_results()
    assert {"run_id", "step", "loss", "lr", "eval_loss"} <= set(res.columns)
    assert sorted(res["run_id"].unique()) == [1, 2]
    # 16 rows, batch 4: 4 steps per run, each step logged.
    assert res.groupby("run_id")["loss"].count().tolist() == [4, 4]
    assert res["eval_loss"].notna().sum() >= 4  # two chunk boundaries per run
    # The same runs as the CLI sees them: a furnace runs folder.
    assert exp.get_runs_info()["config"][0]["lora"]["r"] in (2, 4)


def test_rapidfire_positional_order_and_random_search(tiny_model, extract_rows, exp_dir):
    train, ev = extract_rows
    group = RFRandomSearch(
        {"model_config": sft_config(tiny_model, training_args={"learning_rate": Range(1e-4, 1e-2, log=True)})},
        trainer_type="SFT",
        num_runs=2,
        seed=3,
    )
    exp = Experiment("random", mode="fit", experiments_path=exp_dir)
    with pytest.warns(UserWarning, match="create_model_fn"):
        info = exp.run_fit(group, lambda cfg: None, train, ev, 2)
    lrs = info["trainer.learning_rate"].tolist()
    assert len(lrs) == 2 and len(set(lrs)) == 2 and all(1e-4 <= x <= 1e-2 for x in lrs)


def test_grid_search_refuses_ranges():
    with pytest.raises(ValueError, match="RFRandomSearch"):
        RFGridSearch({"model_config": RFModelConfig(peft_config=RFLoraConfig(r=Range(2, 8)))})


def test_a_hugging_face_style_dataset_is_read(tiny_model, extract_rows, exp_dir):
    train, _ = extract_rows

    class FakeDataset:  # what furnace reads of datasets.Dataset: features and to_list()
        features = {"system": None, "prompt": None, "completion": None}

        def to_list(self):
            return list(train)

    exp = Experiment("hf", mode="fit", experiments_path=exp_dir)
    info = exp.run_fit({"model_config": sft_config(tiny_model)}, train_dataset=FakeDataset(), num_chunks=1)
    assert info["status"].tolist() == ["completed"]


def to_messages(row):
    """RapidFire's formatting function shape: a row of the user's columns to prompt/completion."""
    return {
        "prompt": [{"role": "system", "content": "Extract as JSON."}, {"role": "user", "content": row["sentence"]}],
        "completion": [{"role": "assistant", "content": row["json"]}],
    }


def broken_formatting(row):
    raise ValueError(f"cannot format {row['sentence'][:10]!r}")


def test_formatting_function_feeds_training_and_an_exception_fails_only_its_run(tiny_model, extract_rows, exp_dir):
    train, ev = extract_rows
    # The user's own column names: only the formatting function makes them trainable.
    mine = [{"sentence": r["prompt"], "json": r["completion"]} for r in train]
    mine_ev = [{"sentence": r["prompt"], "json": r["completion"]} for r in ev]
    group = RFGridSearch({"model_config": sft_config(tiny_model, formatting_func=List([to_messages, broken_formatting]))}, trainer_type="SFT")
    exp = Experiment("fmt", mode="fit", experiments_path=exp_dir)
    info = exp.run_fit(group, train_dataset=mine, eval_dataset=mine_ev, num_chunks=2)
    by_fn = {row["trainer.formatting"]: row for _, row in info.iterrows()}
    good = by_fn["python:test_fit.to_messages"]
    bad = by_fn["python:test_fit.broken_formatting"]
    assert good["status"] == "completed", good["error"]
    assert bad["status"] == "failed"
    assert "ValueError: cannot format" in bad["error"] and "Traceback" in bad["error"], bad["error"]
    res = exp.get_results()
    assert res[res.run_id == good["run_id"]]["loss"].notna().sum() == 4


def test_formatted_rows_equal_the_same_rows_given_directly(tiny_model, extract_rows, exp_dir):
    """A formatting function that yields what the file already holds trains identically."""
    train, ev = extract_rows
    direct = [to_messages({"sentence": r["prompt"], "json": r["completion"]}) for r in train]
    mine = [{"sentence": r["prompt"], "json": r["completion"]} for r in train]
    a = Experiment("direct", mode="fit", experiments_path=exp_dir)
    a.run_fit({"model_config": sft_config(tiny_model)}, train_dataset=direct, num_chunks=1)
    b = Experiment("formatted", mode="fit", experiments_path=exp_dir)
    b.run_fit({"model_config": sft_config(tiny_model, formatting_func=to_messages)}, train_dataset=mine, num_chunks=1)
    assert a.get_results()["loss"].tolist() == b.get_results()["loss"].tolist()


SEEN = {}


def count_metrics(eval_preds):
    predictions, labels = eval_preds
    SEEN["predictions"], SEEN["labels"] = list(predictions), list(labels)
    return {"n": len(predictions), "exact": sum(p == l for p, l in zip(predictions, labels)) / len(labels)}


def test_compute_metrics_gets_the_model_predictions_and_labels(tiny_model, extract_rows, exp_dir):
    train, ev = extract_rows
    exp = Experiment("metrics", mode="fit", experiments_path=exp_dir)
    exp.run_fit({"model_config": sft_config(tiny_model, compute_metrics=count_metrics)}, train_dataset=train, eval_dataset=ev, num_chunks=2)
    res = exp.get_results()
    assert res["eval_n"].dropna().tolist() == [4.0, 4.0]
    assert res["eval_exact"].dropna().between(0, 1).all()
    # The labels are the eval set's completions; the predictions are generated text.
    assert SEEN["labels"] == [r["completion"] for r in ev]
    assert len(SEEN["predictions"]) == 4 and all(isinstance(p, str) for p in SEEN["predictions"])


def length_reward(prompts, completions, completions_ids, trainer_state, **kwargs):
    assert "answer" in kwargs  # the dataset's other columns, one value per completion
    return [min(len(c), 20) / 20.0 for c in completions]


def failing_reward(prompts, completions, **kwargs):
    raise RuntimeError("reward server down")


def grpo_group(model, reward):
    return RFGridSearch(
        {
            "model_config": RFModelConfig(
                model_name=model,
                peft_config=RFLoraConfig(r=4, lora_alpha=8),
                training_args=RFGRPOConfig(
                    learning_rate=1e-3, per_device_train_batch_size=2, num_generations=2, max_length=64, max_completion_length=8, max_steps=2
                ),
                reward_funcs=[reward],
            )
        },
        trainer_type="GRPO",
    )


def test_grpo_reward_function_scores_completions(tiny_model, exp_dir):
    prompts = [{"prompt": f"Say {w}.", "answer": w} for w in ["yes", "no", "maybe", "later"]]
    exp = Experiment("grpo", mode="fit", experiments_path=exp_dir)
    info = exp.run_fit(grpo_group(tiny_model, length_reward), train_dataset=prompts, num_chunks=1)
    assert info["status"].tolist() == ["completed"], info["error"].tolist()
    res = exp.get_results()
    rewards = [c for c in res.columns if c.startswith("rewards/") and c.endswith("/mean")]
    assert rewards, list(res.columns)
    assert res[rewards[0]].dropna().between(0, 1).all()


def test_a_failing_reward_fails_its_run_with_the_traceback(tiny_model, exp_dir):
    prompts = [{"prompt": f"Say {w}.", "answer": w} for w in ["yes", "no"]]
    exp = Experiment("grpo-bad", mode="fit", experiments_path=exp_dir)
    info = exp.run_fit(grpo_group(tiny_model, failing_reward), train_dataset=prompts, num_chunks=1)
    assert info["status"].tolist() == ["failed"]
    assert "RuntimeError: reward server down" in info["error"][0]


def test_version_is_the_workspace_version():
    assert furnace.__version__.count(".") == 2
