"""Smoke test of examples/digits_proxynorm.py on a tiny budget: 1 seed, 1 epoch of 64 training images."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from helpers import load_example

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def example():
    with load_example("digits_proxynorm") as module:
        yield module


@pytest.fixture(scope="module")
def output(example, tmp_path_factory):
    out = tmp_path_factory.mktemp("proxynorm")
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:  # main() sets both process-wide: give them back to the other tests
        assert example.main(["--out-dir", str(out), "--seeds", "1", "--epochs", "1", "--max-train", "64", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    with open(out / "digits_proxynorm.json") as handle:
        return out, json.load(handle)


def test_writes_the_table_the_json_and_the_plot(output, example):
    out, payload = output
    assert (out / "digits_proxynorm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "digits_proxynorm.md").read_text()
    for variant in example.VARIANTS:
        assert f"| {variant.name} |" in md
    assert "test acc, mean ± std" in md and "Var_b μ_bc" in md and "| GN → GN + PN |" in md
    assert list(payload["results"]) == [v.name for v in example.VARIANTS]
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]  # atomic writes left nothing behind


def test_every_variant_is_what_its_name_says(output):
    results = output[1]["results"]
    layers = {name: entry["layers"] for name, entry in results.items()}
    assert layers["BN (batch 32)"]["BatchNorm"] == 7 and layers["BN (batch 2)"]["BatchNorm"] == 7
    for name in ("GN", "LN", "GN + PN", "LN + PN", "GN + WS", "GN + WS (all convs)", "IN (extra)"):
        assert "BatchNorm" not in layers[name], name
    for name in ("GN + PN", "LN + PN"):  # every BN → ReLU pair: norm without affine, then ProxyNormAct
        assert layers[name]["ProxyNormAct"] == 7 and layers[name]["GroupNorm(no affine)"] == 7, layers[name]
    assert layers["GN + WS"].get("StdConv", 0) >= 1
    assert layers["GN + WS (all convs)"] == {"GroupNorm(affine)": 7, "StdConv": 8}
    # batch 2 sees the same samples in batches of 2: 16x the steps
    assert results["BN (batch 2)"]["runs"][0]["steps"] == 16 * results["BN (batch 32)"]["runs"][0]["steps"]


def test_runs_and_diagnostics_have_their_fields(output):
    for name, entry in output[1]["results"].items():
        (run,) = entry["runs"]
        assert 0.0 <= run["test_acc"] <= 1.0 and math.isfinite(run["train_loss_eval"]), name
        diag = run["diagnostics"]
        assert len(diag["layers"]) == 7
        mean = diag["mean_over_layers"]
        for key in ("abs_mu_c", "std_sigma_c", "var_b_mu_bc", "var_b_sigma_bc"):
            assert math.isfinite(mean[key]) and mean[key] >= 0, (name, key)
        for layer in diag["layers"]:
            assert sum(layer["shares"].values()) == pytest.approx(1.0, abs=1e-9)
    # instance norm removes both channel-wise and instance-statistics variation: the diagnostics' sanity check
    inorm = output[1]["results"]["IN (extra)"]["runs"][0]["diagnostics"]["mean_over_layers"]
    assert inorm["var_b_mu_bc"] < 1e-10 and inorm["abs_mu_c"] < 1e-6


def test_a_run_is_deterministic(example):
    data = example.load(0)
    data["x_train"], data["y_train"] = data["x_train"][:64], data["y_train"][:64]
    variants = [v for v in example.VARIANTS if v.name == "LN + PN"]
    first, second = (example.run_all(data, 1, 1, variants, width=8, log=lambda *a: None) for _ in range(2))
    a, b = first["LN + PN"]["runs"][0], second["LN + PN"]["runs"][0]
    assert a["test_acc"] == b["test_acc"] and a["epoch_train_loss"] == b["epoch_train_loss"]
    assert a["diagnostics"] == b["diagnostics"]


def test_the_policies_and_the_hand_built_swap_agree(example):
    """Where a policy is registered it builds the variant; the hand-built fallback makes the same model."""
    import normfx

    torch.manual_seed(0)
    bn_model, x = example.ResNet(8), torch.randn(4, 1, 8, 8)
    for variant in example.VARIANTS:
        if variant.policy is None or "ws=" in variant.policy:
            continue
        if example._policy_name(variant.policy) not in normfx.policy_names():
            continue
        built, how = example.build(bn_model, variant)
        hand = example.by_hand(bn_model, variant.policy)
        assert how.startswith("normfx.rewrite")
        assert example.layer_summary(built) == example.layer_summary(hand), variant.name
        torch.testing.assert_close(built.train()(x), hand.train()(x), rtol=0, atol=1e-6)
