"""Shared fixtures of the Python package's tests: the repository's tiny test model and the
shipped extraction data (the tests train and evaluate for real, on the tiny model)."""

import json
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ROOT / "testdata" / "tiny-llama"


def jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def tiny_model():
    assert (TINY / "model.safetensors").is_file(), f"{TINY} is missing (it is committed in the repository)"
    return str(TINY)


@pytest.fixture(scope="session")
def extract_rows():
    train = jsonl(ROOT / "data" / "extract" / "train.jsonl")
    ev = jsonl(ROOT / "data" / "extract" / "eval.jsonl")
    return train[:16], ev[:4]


@pytest.fixture()
def exp_dir(tmp_path):
    return str(tmp_path / "experiments")


@pytest.fixture(scope="session")
def root():
    return ROOT


def pytest_configure(config):
    # The engine's own threads: keep the tests from fighting over the machine's cores.
    os.environ.setdefault("RAYON_NUM_THREADS", "2")
