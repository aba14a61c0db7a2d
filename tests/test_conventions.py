"""``normfx.conventions``: each conversion against hand-computed references, round trips exact (≤ 1e-7 relative in
float64), and raising eps with the variance compensated keeps eval outputs within 1e-6."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import rel_error, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import normfx
from normfx import conventions as cv
from normfx import models
from normfx.errors import InputDataError, ModelError
from normfx.layers import FrozenBatchNorm2d


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# --- momentum ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source, target, value, expected", [
    ("pytorch", "keras", 0.1, 0.9),     # PyTorch 0.1 ≡ TF/Keras 0.9
    ("keras", "pytorch", 0.99, 0.01),   # Keras's default
    ("tf", "torch", 0.997, 0.003),      # TF official ResNet
    ("caffe", "pytorch", 0.999, 0.001),  # Caffe's moving_average_fraction
    ("onnx", "pytorch", 0.9, 0.1),
    ("pytorch", "cudnn", 0.1, 0.1),     # cuDNN's exponentialAverageFactor weights the new batch, like PyTorch
    ("caffe2", "onnx", 0.9, 0.9),
])
def test_momentum_references(source, target, value, expected):
    assert cv.convert_momentum(value, source, target) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("m", [0.1, 0.01, 0.003, 0.001, 0.5, 0.0, 1.0])
def test_momentum_round_trip(m):
    there = cv.convert_momentum(m, "pytorch", "tensorflow")
    assert abs(cv.convert_momentum(there, "tensorflow", "pytorch") - m) <= 1e-7 * max(m, 1e-300) or m == 0.0


def test_momentum_is_the_same_ema():
    """PyTorch's update with m equals TF's update with convert_momentum(m): both formulas, by hand."""
    running, batch, m = 0.7, 2.5, 0.1
    torch_rule = (1 - m) * running + m * batch
    decay = cv.convert_momentum(m, "pytorch", "tensorflow")
    tf_rule = decay * running + (1 - decay) * batch
    assert torch_rule == pytest.approx(tf_rule, rel=1e-12)
    bn = nn.BatchNorm1d(1, momentum=m).train()
    bn.running_mean.fill_(running)
    bn(torch.tensor([[batch - 1.0], [batch + 1.0]]))
    assert float(bn.running_mean) == pytest.approx(torch_rule, rel=1e-6)


def test_momentum_errors():
    with pytest.raises(InputDataError, match="unknown framework"):
        cv.convert_momentum(0.1, "jax", "pytorch")
    with pytest.raises(InputDataError, match="outside"):
        cv.convert_momentum(1.5, "pytorch", "keras")


# --- Caffe, Caffe2, cuDNN ------------------------------------------------------------------------------------


def test_caffe_divides_by_the_scale_factor():
    mean, var = cv.caffe_to_stats([2.0, -4.0, 0.5], [8.0, 2.0, 0.4], [4.0])
    np.testing.assert_array_equal(mean, [0.5, -1.0, 0.125])
    assert rel(var, [2.0, 0.5, 0.1]) <= 1e-15
    zero_mean, zero_var = cv.caffe_to_stats([2.0], [8.0], [0.0])  # Caffe: factor 0 → statistics 0
    assert zero_mean.tolist() == [0.0] and zero_var.tolist() == [0.0]


@pytest.mark.parametrize("factor", [1.0, 999.9000000000001, 0.37])
def test_caffe_round_trip(factor):
    rng = np.random.default_rng(0)
    mean, var = rng.normal(0.3, 1, 16), rng.uniform(0.2, 3, 16)
    blobs = cv.stats_to_caffe(mean, var, factor)
    assert blobs[2].tolist() == [factor]
    back_mean, back_var = cv.caffe_to_stats(*blobs)
    assert rel(back_mean, mean) <= 1e-7 and rel(back_var, var) <= 1e-7


def test_caffe2_riv_is_a_variance():
    """A Caffe2 BN with rm/riv loaded into torch normalizes by sqrt(riv + eps), not by 1/riv."""
    rm, riv = np.array([0.5, -1.0]), np.array([4.0, 0.25])
    mean, var = cv.caffe2_to_stats(rm, riv)
    bn = nn.BatchNorm1d(2, eps=0.0, dtype=torch.float64).eval()
    bn.running_mean.copy_(torch.from_numpy(mean))
    bn.running_var.copy_(torch.from_numpy(var))
    y = bn(torch.tensor([[2.5, 0.0]], dtype=torch.float64))
    np.testing.assert_allclose(y.detach().numpy(), [[(2.5 - 0.5) / 2.0, (0.0 + 1.0) / 0.5]], rtol=1e-15)
    back = cv.stats_to_caffe2(mean, var)
    np.testing.assert_array_equal(back[0], rm)
    np.testing.assert_array_equal(back[1], riv)


def test_cudnn_inverse_std():
    var, eps = np.array([0.25, 4.0, 1e-3]), 1e-5
    inv = 1.0 / np.sqrt(var + eps)  # what cuDNN saves as its inv_variance
    assert rel(cv.cudnn_inv_std_to_var(inv, eps), var) <= 1e-7
    np.testing.assert_allclose(cv.cudnn_inv_std_to_var([2.0], 0.0), [0.25], rtol=1e-15)


# --- biased / unbiased ---------------------------------------------------------------------------------------


def test_biased_unbiased_references():
    np.testing.assert_allclose(cv.biased_to_unbiased([1.0, 2.0], 4), [4 / 3, 8 / 3], rtol=1e-15)
    np.testing.assert_allclose(cv.unbiased_to_biased([4 / 3, 8 / 3], 4), [1.0, 2.0], rtol=1e-15)
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    per_channel = x.transpose(0, 1).reshape(3, -1)
    n = per_channel.shape[1]
    biased, unbiased = per_channel.var(1, unbiased=False).numpy(), per_channel.var(1, unbiased=True).numpy()
    assert rel(cv.biased_to_unbiased(biased, n), unbiased) <= 1e-7
    assert rel(cv.unbiased_to_biased(cv.biased_to_unbiased(biased, n), n), biased) <= 1e-7


def test_biased_matches_torch_running_var():
    """PyTorch's running_var takes the unbiased batch variance (momentum 1: the batch's own)."""
    bn = nn.BatchNorm2d(3, momentum=1.0, dtype=torch.float64).train()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    bn(x)
    biased = x.transpose(0, 1).reshape(3, -1).var(1, unbiased=False).numpy()
    assert rel(cv.biased_to_unbiased(biased, 16), bn.running_var.numpy()) <= 1e-7


@pytest.mark.parametrize("n", [1, 0, 2.5])
def test_count_must_be_two_or_more(n):
    with pytest.raises(InputDataError, match="n must be an integer >= 2"):
        cv.biased_to_unbiased([1.0], n)


# --- eps ------------------------------------------------------------------------------------------------------


def test_compensate_eps_keeps_the_denominator():
    var = np.array([1.0, 0.5, 3e-6, 0.0])
    new_var, new_weight, via_weight = cv.compensate_eps(var, 1e-8, 1e-5, np.array([1.0, -2.0, 0.5, 3.0]))
    assert via_weight.tolist() == [False, False, True, True]
    assert rel(new_var[:2] + 1e-5, var[:2] + 1e-8) <= 1e-15
    np.testing.assert_array_equal(new_var[2:], var[2:])  # tiny variances keep their value, γ compensates
    expected_weight = np.array([1.0, -2.0, 0.5 * np.sqrt((3e-6 + 1e-5) / (3e-6 + 1e-8)), 3.0 * np.sqrt(1e-5 / 1e-8)])
    assert rel(new_weight, expected_weight) <= 1e-15
    scale_before = np.array([1.0, -2.0, 0.5, 3.0]) / np.sqrt(var + 1e-8)
    assert rel(new_weight / np.sqrt(new_var + 1e-5), scale_before) <= 1e-12


def test_compensate_eps_without_affine_refuses_tiny_variances():
    with pytest.raises(InputDataError, match="affine=False"):
        cv.compensate_eps([1e-7], 1e-8, 1e-5, None)
    new_var, weight, _ = cv.compensate_eps([1.0], 1e-8, 1e-5, None)
    assert weight is None and new_var[0] == pytest.approx(1.0 + 1e-8 - 1e-5, rel=1e-15)


def _small_eps(model: nn.Module, eps: float, tiny_channels: bool) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if normfx.layers.is_batchnorm(module):
                module.eps = eps
                if tiny_channels:
                    module.running_var[0] = 2e-6  # below new_eps - eps: compensated through γ
    return model


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mlp", "bn_conv"])
@pytest.mark.parametrize("tiny_channels", [False, True])
def test_raise_eps_keeps_eval_outputs(name, tiny_channels):
    model = _small_eps(models.create(name), 1e-8, tiny_channels)
    x = models.example_input(name, batch=4)
    before = snapshot(model)
    raised, report = cv.raise_eps(model, 1e-5)
    for key, value in before.items():  # the caller's model is untouched
        assert torch.equal(model.state_dict()[key], value)
    bns = [m for m in raised.modules() if normfx.layers.is_batchnorm(m)]
    assert all(m.eps == 1e-5 for m in bns) and len(report.changed) == len(bns)
    assert all(bool(c.via_weight) is tiny_channels for c in report.changed)
    model64 = copy.deepcopy(model).double()
    raised64, _ = cv.raise_eps(model64, 1e-5)  # float64 storage: the compensation is exact up to float64 rounding
    with torch.no_grad():
        y64 = model64(x.double())
        floor = rel_error(y64, model(x))  # the original's own fp32 error
        error = rel_error(model(x), raised(x))
        error64 = rel_error(y64, raised64(x.double()))
        against64 = rel_error(y64, raised(x))
    # float64: exact up to float64 rounding (measured worst 8.0e-12: mobilenet_v2 with tiny channels, whose γ/σ ~ 700
    # amplify rounding; 0 to 1e-15 elsewhere)
    assert error64 <= 1e-10, error64
    # fp32: within 1e-6 of the original; where channels with γ/σ ~ 700 (tiny_channels) lift the model's own fp32
    # noise above that (mobilenet_v2: 3.7e-4), within twice that noise of the float64 original, as the original is
    assert against64 <= max(1e-6, 2 * floor), (against64, floor)
    if floor <= 1e-6:
        assert error <= 1e-6, error
    assert not [f for f in normfx.lint(raised).findings if f.check == "eps"]
    assert "eps raised to 1e-05" in str(report)


def test_raise_eps_frozen_bn_and_untouched_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4, eps=1e-7), nn.BatchNorm2d(4, eps=1e-3)).eval()
    models.randomize_batchnorm(model, 0)
    raised, report = cv.raise_eps(model)
    assert [c.layer for c in report.changed] == ["1"] and raised[2].eps == 1e-3 and raised[1].eps == 1e-5
    x = torch.randn(2, 3, 4, 4)
    assert rel_error(model(x), raised(x)) <= 1e-6
    unchanged, nothing = cv.raise_eps(raised)
    assert not nothing.changed and "already" in str(nothing)


def test_raise_eps_errors():
    with pytest.raises(ModelError):
        cv.raise_eps("model.onnx")
    with pytest.raises(InputDataError):
        cv.raise_eps(nn.BatchNorm2d(2), 0.0)


# --- Keras / TF weight dicts --------------------------------------------------------------------------------


def keras_weights(c: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"gamma": rng.uniform(0.5, 1.5, c) * np.where(rng.random(c) < 0.3, -1, 1), "beta": rng.normal(0, 0.3, c),
            "moving_mean": rng.normal(0.3, 0.8, c), "moving_variance": rng.uniform(0.2, 3.0, c)}


def test_from_keras_against_the_keras_formula():
    """Keras's inference formula, by hand, on a channels-last input; torch's BN on the same input channels-first."""
    w, eps = keras_weights(), 1e-3
    bn = cv.from_keras(w, epsilon=eps, momentum=0.99, dtype=torch.float64)
    assert bn.eps == eps and bn.momentum == pytest.approx(0.01, rel=1e-7) and not bn.training
    x_nhwc = np.random.default_rng(1).normal(0, 2, (2, 5, 5, 6))
    expected = w["gamma"] * (x_nhwc - w["moving_mean"]) / np.sqrt(w["moving_variance"] + eps) + w["beta"]
    y = bn(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    assert rel(y, expected) <= 1e-7


def test_keras_round_trips_are_exact():
    w = keras_weights()
    weights, config = cv.to_keras(cv.from_keras(w, epsilon=1e-3, momentum=0.99, dtype=torch.float64))
    assert set(weights) == set(cv.KERAS_KEYS)
    for key in cv.KERAS_KEYS:
        np.testing.assert_array_equal(weights[key], w[key])
    assert config["epsilon"] == 1e-3 and abs(config["momentum"] - 0.99) <= 1e-7 * 0.99
    torch_bn = models.randomize_batchnorm(nn.BatchNorm2d(8, eps=2e-5, momentum=0.03, dtype=torch.float64), 3)
    weights, config = cv.to_keras(torch_bn)
    back = cv.from_keras(weights, epsilon=config["epsilon"], momentum=config["momentum"], dtype=torch.float64)
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(back, key), getattr(torch_bn, key)), key
    assert back.eps == 2e-5 and abs(back.momentum - 0.03) <= 1e-7 * 0.03


def test_keras_variable_names_and_missing_affine():
    w = keras_weights(4)
    named = {f"block1/bn/{k}:0": v for k, v in w.items() if k != "beta"}  # center=False: no beta
    bn = cv.from_keras(named, dims=1)
    assert isinstance(bn, nn.BatchNorm1d) and torch.equal(bn.bias, torch.zeros(4))
    assert torch.allclose(bn.weight, torch.tensor(w["gamma"], dtype=torch.float32))
    weights, config = cv.to_keras(nn.BatchNorm2d(4, affine=False))
    assert set(weights) == {"moving_mean", "moving_variance"} and config["center"] is False


@pytest.mark.parametrize("weights, match", [
    ({"gamma": [1.0], "moving_mean": [0.0]}, "lack moving_variance"),
    ({"kernel": [1.0]}, "unknown Keras"),
    ({"moving_mean": [0.0, 1.0], "moving_variance": [1.0]}, "different sizes"),
    ({"moving_mean": [np.nan], "moving_variance": [1.0]}, "NaN"),
])
def test_keras_errors(weights, match):
    with pytest.raises(InputDataError, match=match):
        cv.from_keras(weights)


def test_to_keras_refuses_other_modules():
    with pytest.raises(ModelError):
        cv.to_keras(nn.Conv2d(1, 1, 1))


@settings(max_examples=200, deadline=None)
@given(var=st.lists(st.floats(0.0, 1e3), min_size=1, max_size=16),
       eps=st.floats(0.0, 1e-6), new_eps=st.floats(1e-5, 1e-1),
       gamma=st.floats(-3, 3).filter(lambda g: abs(g) > 1e-3))
def test_compensate_eps_keeps_scale_and_shift(var, eps, new_eps, gamma):
    v = np.array(var) + 1e-12  # var + eps > 0: a defined BN
    weight = np.full(v.shape, gamma)
    new_var, new_weight, _ = cv.compensate_eps(v, eps, new_eps, weight)
    assert np.all(new_var > 0)
    before = weight / np.sqrt(v + eps)
    after = new_weight / np.sqrt(new_var + new_eps)
    assert rel(after, before) <= 1e-12
