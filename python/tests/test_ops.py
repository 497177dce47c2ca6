"""IC ops from Python (stop, resume, delete, clone) while run_fit runs and after it; a
KeyboardInterrupt stops cleanly and calling run_fit again continues; the live table and
the dashboard beside it."""

import json
import threading
import time
import _thread
import urllib.request

import pytest

from furnace import Experiment
from furnace.automl import List, RFGridSearch, RFLoraConfig, RFModelConfig, RFSFTConfig
from furnace import notebook


def group(model, ranks=(2, 4), epochs=1, batch=2):
    return RFGridSearch(
        {
            "model_config": RFModelConfig(
                model_name=model,
                peft_config=RFLoraConfig(r=List(list(ranks)), lora_alpha=8),
                training_args=RFSFTConfig(learning_rate=1e-3, per_device_train_batch_size=batch, max_length=64, num_train_epochs=epochs),
            )
        },
        trainer_type="SFT",
    )


def wait_until(pred, timeout=120):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_stop_resume_clone_delete_from_python(tiny_model, extract_rows, exp_dir):
    train, ev = extract_rows
    exp = Experiment("ops", mode="fit", experiments_path=exp_dir)
    done = {}

    def steer():
        # While run_fit trains (it holds no GIL while waiting), stop run 1 after its first chunk.
        ok = wait_until(lambda: exp.name is not None and (exp.get_runs_info().set_index("run_id").loc[1, "chunks_done"] >= 1))
        done["stop"] = exp.stop(1) if ok else None

    t = threading.Thread(target=steer)
    t.start()
    info = exp.run_fit(group(tiny_model), train_dataset=train * 2, eval_dataset=ev, num_chunks=8)
    t.join()
    assert done["stop"] is not None, "run 1 never finished a chunk"
    status = dict(zip(info.run_id, info.status))
    assert status == {1: "stopped", 2: "completed"}, info[["run_id", "status", "chunks_done"]]
    # Resume it and clone run 2 with a changed rank, warm; delete nothing yet.
    exp.resume(1)
    clone_op = exp.clone(2, {"lora": {"r": 8}}, warm=False)
    assert clone_op > 0
    info = exp.resume_experiment()
    status = dict(zip(info.run_id, info.status))
    assert status[1] == "completed"
    assert len(info) == 3
    clone = info[info.run_id == 3].iloc[0]
    assert clone["parent_id"] == 2 and clone["config"]["lora"]["r"] == 8 and clone["status"] == "completed"
    exp.delete(3)
    # A delete applies when the experiment next runs (at a chunk boundary).
    exp.resume_experiment()
    assert exp.get_runs_info().set_index("run_id").loc[3, "status"] == "deleted"
    ops = exp.get_ops()
    assert {"stop", "resume", "clone", "delete"} <= set(ops["op"])
    assert set(ops["status"]) == {"applied"}, ops


def test_a_bad_op_is_refused_with_a_clear_error(tiny_model, extract_rows, exp_dir):
    train, _ = extract_rows
    exp = Experiment("badop", mode="fit", experiments_path=exp_dir)
    exp.run_fit(group(tiny_model, ranks=(2,)), train_dataset=train, num_chunks=1)
    with pytest.raises(ValueError, match="run 99|not found|no run"):
        exp.stop(99)
    with pytest.raises(ValueError, match="lora"):
        exp.clone(1, {"lora.nosuchkey": 3})


def test_keyboard_interrupt_stops_cleanly_and_run_fit_again_continues(tiny_model, extract_rows, exp_dir):
    train, ev = extract_rows
    exp = Experiment("interrupt", mode="fit", experiments_path=exp_dir)
    # Enough epochs that the runs cannot finish between the second step and the interrupt
    # (tiny-llama trains a step in milliseconds).
    cfg = group(tiny_model, epochs=20)

    def interrupt():
        wait_until(lambda: exp.name is not None and exp.get_runs_info()["steps_done"].max() >= 2)
        _thread.interrupt_main()  # what a Jupyter kernel interrupt / Ctrl-C raises

    t = threading.Thread(target=interrupt)
    t.start()
    with pytest.raises(KeyboardInterrupt):
        exp.run_fit(cfg, train_dataset=train, eval_dataset=ev, num_chunks=4)
    t.join()
    info = exp.get_runs_info()
    assert (info["status"] != "completed").any(), "training finished before the interrupt"
    assert (info["status"] != "failed").all()
    stopped_at = dict(zip(info.run_id, info.steps_done))
    # The same call again (a re-run cell) continues the same experiment from its checkpoints.
    again = Experiment("interrupt", mode="fit", experiments_path=exp_dir)
    info = again.run_fit(cfg, train_dataset=train, eval_dataset=ev, num_chunks=4)
    assert again.name == "interrupt"
    assert info["status"].tolist() == ["completed", "completed"]
    res = again.get_results()
    # Every step logged once: nothing trained twice, nothing lost.
    for run_id, steps in res.groupby("run_id")["step"]:
        assert sorted(steps) == list(range(1, len(steps) + 1)), (run_id, sorted(steps))
        assert len(steps) >= stopped_at[run_id]


def test_live_table_and_dashboard_buttons_reach_the_experiment(tiny_model, extract_rows, exp_dir):
    train, _ = extract_rows
    exp = Experiment("table", mode="fit", experiments_path=exp_dir, dashboard=True, notebook_origins=["http://localhost:8888"])
    try:
        assert exp.dashboard_url.startswith("http://127.0.0.1:")
        exp.run_fit(group(tiny_model), train_dataset=train, num_chunks=1)
        rows = notebook.runs_table(exp)
        assert [r["run"] for r in rows] == [1, 2] and all("loss" in r["metrics"] for r in rows)
        page = notebook.render_html(exp, rows)
        assert page.count("<tr>") == 3 and f"{exp.dashboard_url}/api/ops" in page and "Clone" in page
        # What a button does: a POST from the notebook's origin (CORS allowed).
        req = urllib.request.Request(
            f"{exp.dashboard_url}/api/ops",
            data=json.dumps({"run": 1, "op": "clone", "set": ["lora.r=8"], "warm": False}).encode(),
            headers={"Content-Type": "application/json", "Origin": "http://localhost:8888"},
            method="POST",
        )
        with urllib.request.urlopen(req) as r:
            assert r.status == 202
            assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:8888"
        ops = exp.get_ops()
        assert len(ops) == 1 and ops.iloc[0]["run_id"] == 1
        # A page from another origin is refused.
        bad = urllib.request.Request(
            f"{exp.dashboard_url}/api/ops", data=b'{"run": 1, "op": "stop"}',
            headers={"Content-Type": "application/json", "Origin": "http://evil.example"}, method="POST",
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad)
        assert e.value.code == 403
    finally:
        exp.end()
