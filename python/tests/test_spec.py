"""RapidFire-shaped configs to furnace specs, checked on the spec text itself (parsed back
with tomllib), and the reward trampoline's calling convention. No model runs here."""

import inspect
import json
import os
import sys

import pytest

from furnace import Experiment
from furnace._hooks import Registry, _trampoline
from furnace._spec import SpecError, evals_spec, fit_spec
from furnace.automl import List, RFGRPOConfig, RFLoraConfig, RFModelConfig, RFOpenAIAPIModelConfig, RFSFTConfig, RFvLLMModelConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the test venv is 3.11
    tomllib = pytest.importorskip("tomli")


def fit(model_config, trainer_type="SFT"):
    from furnace.automl import RFGridSearch

    text = fit_spec("t", RFGridSearch({"model_config": model_config}, trainer_type=trainer_type), "train.jsonl", None, 2, 1, Registry())
    return tomllib.loads(text)


def exact(eval_preds):
    return {"exact": 0.0}


def test_sft_ignores_sampling_settings_and_takes_the_answer_length_only_with_compute_metrics():
    gen = {"temperature": 0.7, "top_p": 0.9, "top_k": 5, "max_new_tokens": 12}
    spec = fit(RFModelConfig(model_name="m", training_args=RFSFTConfig(max_steps=2), generation_config=gen))
    assert not {"temperature", "top_p", "top_k", "max_completion_length"} & set(spec["trainer"])
    spec = fit(RFModelConfig(model_name="m", training_args=RFSFTConfig(max_steps=2), generation_config=gen, compute_metrics=exact))
    assert spec["trainer"]["max_completion_length"] == 12
    assert not {"temperature", "top_p", "top_k"} & set(spec["trainer"])


def test_grpo_takes_the_sampling_settings():
    spec = fit(
        RFModelConfig(
            model_name="m",
            training_args=RFGRPOConfig(max_steps=2),
            generation_config={"temperature": 0.7, "max_new_tokens": 12},
            reward_funcs=[lambda prompts, completions, **kw: [0.0] * len(completions)],
        ),
        "GRPO",
    )
    assert (spec["trainer"]["temperature"], spec["trainer"]["max_completion_length"]) == (0.7, 12)


def test_a_list_of_whole_configs_makes_one_group_each():
    spec = fit(
        RFModelConfig(
            model_name="m",
            peft_config=List([RFLoraConfig(r=4, lora_alpha=8), RFLoraConfig(r=List([8, 16]), lora_alpha=16)]),
            training_args=List([RFSFTConfig(learning_rate=1e-3), RFSFTConfig(learning_rate=1e-4)]),
        )
    )
    groups = spec["group"]
    assert len(groups) == 4
    assert [(g["lora"]["alpha"], g["trainer"]["learning_rate"]) for g in groups] == [(8, 1e-3), (8, 1e-4), (16, 1e-3), (16, 1e-4)]
    assert groups[2]["lora"]["r"] == {"list": [8, 16]}  # a knob inside a config stays a knob


def test_epochs_are_whole():
    assert fit(RFModelConfig(model_name="m", training_args=RFSFTConfig(num_train_epochs=2.0)))["trainer"]["epochs"] == 2
    with pytest.raises(SpecError, match="num_train_epochs=1.5"):
        fit(RFModelConfig(model_name="m", training_args=RFSFTConfig(num_train_epochs=1.5)))


def test_reward_names_are_valid_and_unique():
    def make():
        def score(prompts, completions, **kw):
            return [1.0] * len(completions)

        return score

    spec = fit(
        RFModelConfig(model_name="m", training_args=RFGRPOConfig(max_steps=1), reward_funcs=[lambda **kw: [], make(), make(), {"kind": "json"}]),
        "GRPO",
    )
    assert [r.get("name", r["kind"]) for r in spec["reward"]] == ["reward_0", "score", "score_2", "json"]


def evals(configs):
    reg = Registry()
    text = evals_spec("e", configs, "data.jsonl", "question", "answers", 2, 1, reg, "/nonexistent", lambda rows: "x.jsonl")
    return tomllib.loads(text)


def test_unknown_evals_keys_are_errors_and_rapidfire_keys_are_understood():
    gen = RFvLLMModelConfig(model_config={"model": "m"}, sampling_params={"max_tokens": 4})
    spec = evals({"vllm_config": gen, "batch_size": 8, "metrics": ["exact_match"]})
    assert spec["generator"]["model"] == "m"
    with pytest.raises(SpecError, match="accumulate_metric_fn"):
        evals({"generator_config": gen, "metrics": ["exact_match"], "accumulate_metric_fn": print})


def test_two_api_keys_are_two_environment_variables():
    def openai(key):
        return {"openai_config": RFOpenAIAPIModelConfig(client_config={"api_key": key}, model_config={"model": "gpt"}), "metrics": ["exact_match"]}

    spec = evals([openai("sk-one"), openai("sk-two")])
    envs = [g["generator"]["api_key_env"] for g in spec["group"]]
    assert envs[0] != envs[1]
    assert [os.environ[e] for e in envs] == ["sk-one", "sk-two"]
    assert "sk-one" not in json.dumps(spec)


def test_run_evals_takes_rapidfires_positional_order():
    params = list(inspect.signature(Experiment.run_evals).parameters)
    assert params[:6] == ["self", "config_group", "dataset", "num_shards", "num_actors", "seed"]


def test_a_reward_gets_trls_and_rapidfires_arguments_and_may_return_none():
    seen = {}

    def reward(prompts, completions, completion_ids, completions_ids, trainer_state, answer):
        seen.update(step=trainer_state.global_step, step_item=trainer_state["global_step"], ids=completion_ids, same=completions_ids is completion_ids)
        return [None, 1]

    call = _trampoline("python:t.reward", "reward", reward)
    arg = {"prompts": ["p", "p"], "completions": ["a", "b"], "completion_ids": [[1], [2]], "columns": {"answer": [1, 2]}, "step": 3}
    out = json.loads(call(json.dumps(arg)))
    assert out == {"ok": [None, 1.0]}, out  # None travels as null: "no score" to the engine
    assert seen == {"step": 3, "step_item": 3, "ids": [[1], [2]], "same": True}
