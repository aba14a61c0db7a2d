"""Smoke test of examples/digits_ghost_bn.py on a tiny budget: 1 seed, 1 epoch of 64 training images."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import load_example

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def example():
    with load_example("digits_ghost_bn") as module:
        yield module


@pytest.fixture(scope="module")
def tiny_data(example):
    data = example.load(0)
    data["x_train"], data["y_train"] = data["x_train"][:64], data["y_train"][:64]
    return data


def test_writes_the_table_the_json_and_the_plot(example, tmp_path):
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:  # main() sets both process-wide: give them back to the other tests
        assert example.main(["--out", str(tmp_path), "--seeds", "1", "--epochs", "1", "--max-train", "64",
                             "--nbs", "2,32", "--width", "8", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    assert (tmp_path / "digits_ghost_bn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "digits_ghost_bn.md").read_text()
    assert "| 2 |" in md and "| 32 |" in md and "val err %" in md
    payload = json.loads((tmp_path / "digits_ghost_bn.json").read_text())
    assert list(payload["results"]) == ["2", "32"]
    for entry in payload["results"].values():
        (run,) = entry["runs"]
        assert run["steps"] == 2 and 0.0 <= run["val_err"] <= 1.0 and 0.0 <= run["train_err"] <= 1.0
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_a_run_is_deterministic_and_nbs_32_is_batchnorm(example, tiny_data):
    first = example.run_one(4, tiny_data, 0, 1, width=8)
    assert example.run_one(4, tiny_data, 0, 1, width=8) == first
    torch.manual_seed(0)
    plain = example.net(8)  # no rewrite: BatchNorm with the batch of 32 as its normalization batch
    seen = example.train(plain, tiny_data, 0, 1)
    ghost32 = example.run_one(32, tiny_data, 0, 1, width=8)
    assert seen["train_loss_last_epoch"] == ghost32["train_loss_last_epoch"]
    assert example.error(plain, tiny_data["x_val"], tiny_data["y_val"]) == ghost32["val_err"]
