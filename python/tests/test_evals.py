"""run_evals from Python on the tiny model: preprocess, postprocess, metric and
accumulate functions called by the engine shard by shard, results as RapidFire returns
them and as a DataFrame, and an exception failing only its pipeline."""

import pytest

from furnace import Experiment
from furnace.automl import List, RFLocalModelConfig

QUESTIONS = [{"question": f"What is {i} plus {i}?", "answers": [str(2 * i)]} for i in range(8)]
SEEN = {"pre": 0, "metric_batches": []}


def preprocess(batch, rag, prompt_manager):
    SEEN["pre"] += 1
    assert rag.get_context(batch["question"]) == [c or "" for c in batch["context"]]
    prompts = [[{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": q}] for q in batch["question"]]
    return {"prompts": prompts, "row_parity": [int(q.split()[2]) % 2 for q in batch["question"]], **batch}


def postprocess(batch):
    # The tiny model answers nonsense: make half the answers right, so every metric is known.
    batch["generated_text"] = [a[0] if p == 0 else "wrong" for a, p in zip(batch["answers"], batch["row_parity"])]
    return batch


def compute_metrics(batch):
    SEEN["metric_batches"].append(len(batch["generated_text"]))
    correct = sum(g == a[0] for g, a in zip(batch["generated_text"], batch["answers"]))
    n = len(batch["generated_text"])
    return {"Correct": {"value": correct}, "Total": {"value": n}}


def accumulate(aggregated):
    # As in RapidFire: the accuracy is derived here from the shards' counts.
    correct = sum(m["value"] for m in aggregated["Correct"])
    total = sum(m["value"] for m in aggregated["Total"])
    return {
        "Correct": {"value": correct, "is_distributive": True},
        "Accuracy": {"value": correct / total, "is_algebraic": True, "value_range": (0, 1)},
        "Total": {"value": total, "is_distributive": True, "value_range": (0, 1)},
    }


def broken_preprocess(batch, rag, prompt_manager):
    raise KeyError("no such column 'query'")


def config(model, pre=preprocess):
    return {
        "generator_config": RFLocalModelConfig(model_config={"model": model}, sampling_params={"max_tokens": 4, "temperature": 0.0}),
        "preprocess_fn": pre,
        "postprocess_fn": postprocess,
        "compute_metrics_fn": compute_metrics,
        "accumulate_metrics_fn": accumulate,
        "metrics": ["exact_match"],
        "online_strategy_kwargs": {"strategy_name": "wilson", "confidence_level": 0.9},
    }


def test_evals_with_every_kind_of_user_function(tiny_model, exp_dir):
    exp = Experiment("rag", mode="evals", experiments_path=exp_dir)
    results = exp.run_evals(config(tiny_model), QUESTIONS, num_shards=4, seed=1)
    assert SEEN["pre"] >= 4 and sum(SEEN["metric_batches"][-4:]) == 8
    (run_id,) = results
    final, cumulative = results[run_id]
    assert final["Accuracy"]["value"] == pytest.approx(0.5)
    assert final["exact_match"]["value"] == pytest.approx(0.5)  # built-ins score the postprocessed text
    assert final["Total"]["value"] == pytest.approx(8)
    assert len(cumulative["Accuracy"]) == 4  # one estimate per shard
    lo, hi = final["exact_match"]["lower"], final["exact_match"]["upper"]
    assert lo <= 0.5 <= hi  # the whole set seen: with the finite population correction the interval closes
    res = exp.get_results()
    assert {"run_id", "step", "Accuracy", "exact_match", "exact_match_lower", "exact_match_upper"} <= set(res.columns)
    assert res["step"].max() == 4
    info = exp.get_runs_info()
    assert info["status"].tolist() == ["completed"]


def test_an_exception_in_a_user_function_fails_only_its_pipeline(tiny_model, exp_dir):
    exp = Experiment("rag-bad", mode="evals", experiments_path=exp_dir)
    cfg = config(tiny_model, pre=List([preprocess, broken_preprocess]))
    results = exp.run_evals(cfg, QUESTIONS, num_shards=2)
    info = exp.get_runs_info().set_index("prompt.preprocess")
    good = info.loc["python:test_evals.preprocess"]
    bad = info.loc["python:test_evals.broken_preprocess"]
    assert good["status"] == "completed", good["error"]
    assert bad["status"] == "failed"
    assert "KeyError" in bad["error"] and "no such column" in bad["error"]
    assert results[int(good["run_id"])][0]["Accuracy"]["value"] == pytest.approx(0.5)


def test_mode_mismatch_says_which_call_to_use(exp_dir):
    exp = Experiment("x", mode="evals", experiments_path=exp_dir)
    with pytest.raises(RuntimeError, match="run_evals"):
        exp.run_fit({}, train_dataset=[{"a": 1}])
