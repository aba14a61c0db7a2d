"""ProxyNormAct and StdConv: the official recipe's numbers, gradients, dtypes, state_dicts, fx and ONNX."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from helpers import rel_error
from scipy.special import erfinv
from torch import nn

from normfx.layers import ProxyNormAct, StdConv1d, StdConv2d, StdConv3d, param_groups, proxy_quantiles

ACTIVATIONS = {
    "relu": nn.ReLU(), "relu6": nn.ReLU6(), "silu": nn.SiLU(), "gelu": nn.GELU(), "leaky_relu": nn.LeakyReLU(0.1),
    "tanh_callable": torch.tanh, "swish_lambda": lambda x: x * torch.sigmoid(x),
}
NUMPY_ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0), "relu6": lambda x: np.clip(x, 0, 6), "silu": lambda x: x / (1 + np.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2))),
    "leaky_relu": lambda x: np.where(x > 0, x, 0.1 * x), "tanh_callable": np.tanh,
    "swish_lambda": lambda x: x / (1 + np.exp(-x)),
}


def _randomized(layer: ProxyNormAct, seed: int = 0) -> ProxyNormAct:
    gen = torch.Generator().manual_seed(seed)
    c = layer.num_channels
    with torch.no_grad():
        layer.weight.copy_(torch.rand(c, generator=gen) * 1.5 + 0.25)
        layer.bias.copy_(torch.randn(c, generator=gen) * 0.5)
        layer.proxy_weight.copy_(torch.randn(c, generator=gen) * 0.2)
        layer.proxy_bias.copy_(torch.randn(c, generator=gen) * 0.2)
    return layer


def _official_recipe(layer: ProxyNormAct, y: np.ndarray, act) -> np.ndarray:
    """Graphcore's TF1 recipe in float64 numpy: midpoint quantiles, biased proxy variance, eps."""
    n = layer.num_samples
    q = math.sqrt(2) * erfinv(2 * (np.arange(n) + 0.5) / n - 1)
    g, b = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()
    gt, bt = layer.proxy_weight.detach().double().numpy(), layer.proxy_bias.detach().double().numpy()
    proxy_y = (1 + gt)[:, None] * q[None, :] + bt[:, None]
    proxy_z = act(g[:, None] * proxy_y + b[:, None])
    mean, var = proxy_z.mean(1), proxy_z.var(1)  # numpy var is the biased one
    shape = (1, -1) + (1,) * (y.ndim - 2)
    z = act(g.reshape(shape) * y + b.reshape(shape))
    return (z - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + layer.eps)


def test_quantiles_are_the_midpoint_quantiles_of_a_standard_normal():
    q = proxy_quantiles(200)
    expected = math.sqrt(2) * erfinv(2 * (np.arange(200) + 0.5) / 200 - 1)
    assert q.dtype == torch.float64 and np.allclose(q.numpy(), expected, rtol=1e-14, atol=1e-14)
    assert abs(float(q.mean())) < 1e-12 and abs(float(q.var(unbiased=False)) - 1) < 0.02  # tails truncated
    with pytest.raises(ValueError, match="num_samples"):
        proxy_quantiles(1)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_matches_the_official_recipe_in_float64(name):
    layer = _randomized(ProxyNormAct(6, ACTIVATIONS[name]))
    y = torch.randn(4, 6, 5, 3, generator=torch.Generator().manual_seed(1))
    expected = _official_recipe(layer, y.double().numpy(), NUMPY_ACTIVATIONS[name])
    assert rel_error(torch.from_numpy(expected), layer(y)) <= 1e-5
    assert rel_error(torch.from_numpy(expected), layer.double()(y.double())) <= 1e-12


@pytest.mark.parametrize("name", ["relu", "silu", "gelu", "relu6"])
def test_at_init_a_standard_normal_input_comes_out_channel_wise_normalized(name):
    layer = ProxyNormAct(8, ACTIVATIONS[name])
    y = torch.randn(64, 8, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = layer(y)
        proxy_var = layer.proxy_moments()[1]
    mean, var = out.mean((0, 2, 3)), out.var((0, 2, 3))
    assert float(mean.abs().max()) < 0.02
    # 1 up to the proxy eps: var / (var + 0.03) = 0.92 for ReLU, whose variance is 0.34 (measured 0.885-0.964
    # over channels of 16384 values)
    assert abs(float(var.mean() - (proxy_var / (proxy_var + layer.eps)).mean())) < 0.03
    assert float((var - 1).abs().max()) < 0.15


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 7), (2, 4, 3, 5), (2, 4, 2, 3, 2)])
def test_channels_first_tensors_of_any_rank(shape):
    layer = _randomized(ProxyNormAct(4, nn.SiLU()))
    y = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    expected = _official_recipe(layer, y.double().numpy(), NUMPY_ACTIVATIONS["silu"])
    assert layer(y).shape == y.shape and rel_error(torch.from_numpy(expected), layer(y)) <= 1e-5


@pytest.mark.parametrize("name", ["relu", "silu", "gelu"])
def test_gradcheck_through_the_proxy_statistics(name):
    layer = _randomized(ProxyNormAct(3, ACTIVATIONS[name], num_samples=16)).double()
    y = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.3
    y.requires_grad_(True)
    params = [layer.weight, layer.bias, layer.proxy_weight, layer.proxy_bias]

    def fn(y, weight, bias, proxy_weight, proxy_bias):
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias, "proxy_weight": proxy_weight,
                                                  "proxy_bias": proxy_bias}, (y,))

    assert torch.autograd.gradcheck(fn, (y, *[p.detach().clone().requires_grad_(True) for p in params]))
    layer(y).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in params)


def test_half_input_keeps_float32_statistics():
    layer = _randomized(ProxyNormAct(4, nn.GELU()))
    y = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(5))
    reference = layer(y)
    half = layer.bfloat16()
    assert half.quantiles.dtype == torch.float32  # the proxy statistics stay in float32
    out = half(y.bfloat16())
    assert out.dtype == torch.bfloat16
    assert rel_error(reference, out.float()) <= 3e-2  # bfloat16 rounding of parameters and activations


def test_state_dict_round_trip_and_keys():
    layer = _randomized(ProxyNormAct(5, nn.ReLU()))
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "proxy_weight", "proxy_bias"}  # quantiles are derived, not stored
    fresh = ProxyNormAct(5, nn.ReLU())
    fresh.load_state_dict(state)
    y = torch.randn(3, 5, 4)
    assert torch.equal(fresh(y), layer(y))


def test_param_groups_decay_the_proxy_parameters_only():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(1, 4, affine=False), ProxyNormAct(4))
    groups = param_groups(model, 5e-5)
    decayed = {id(p) for p in groups[0]["params"]}
    pn = model[2]
    assert groups[0]["weight_decay"] == 5e-5 and groups[1]["weight_decay"] == 0.0
    assert {id(pn.proxy_weight), id(pn.proxy_bias), id(model[0].weight)} == decayed
    assert {id(pn.weight), id(pn.bias), id(model[0].bias)} == {id(p) for p in groups[1]["params"]}


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_channels"):
        ProxyNormAct(0)
    with pytest.raises(ValueError, match="eps"):
        ProxyNormAct(3, eps=0)
    with pytest.raises(TypeError, match="activation"):
        ProxyNormAct(3, "relu")


def _net(act=nn.SiLU()):
    return nn.Sequential(StdConv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8, affine=False),
                         _randomized(ProxyNormAct(8, act)), nn.Conv2d(8, 4, 1)).eval()


def test_fx_traceable_and_onnx_exportable():
    model = _net()
    x = torch.randn(2, 3, 8, 8)
    traced = torch.fx.symbolic_trace(model)
    assert rel_error(model(x), traced(x)) == 0.0
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n"}})
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert rel_error(model(x3), torch.from_numpy(session.run(None, {"x": x3.numpy()})[0])) <= 1e-5


@pytest.mark.parametrize("cls,conv,shape", [(StdConv1d, nn.Conv1d, (2, 4, 9)), (StdConv2d, nn.Conv2d, (2, 4, 7, 6)),
                                            (StdConv3d, nn.Conv3d, (2, 4, 5, 4, 3))])
def test_std_conv_standardizes_each_output_channel(cls, conv, shape):
    torch.manual_seed(6)
    plain = conv(4, 6, 3, padding=1, groups=2)
    std = cls.from_conv(plain, ws_eps=1e-5)
    w = plain.weight.detach().double()
    dims = tuple(range(1, w.dim()))
    expected = (w - w.mean(dims, keepdim=True)) / (w.var(dims, unbiased=False, keepdim=True) + 1e-5).sqrt()
    assert rel_error(expected, std.standardized_weight()) <= 1e-6
    x = torch.randn(shape)
    conv_fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(shape) - 2]
    reference = conv_fn(x.double(), expected, plain.bias.double(), padding=1, groups=2)
    assert rel_error(reference, std(x)) <= 1e-5
    assert set(std.state_dict()) == {"weight", "bias"}  # a plain conv checkpoint loads as it is
    again = cls(4, 6, 3, padding=1, groups=2, ws_eps=1e-5)
    again.load_state_dict(plain.state_dict())
    assert torch.equal(again(x), std(x))
    with pytest.raises(ValueError, match="ws_eps"):
        cls(4, 6, 3, ws_eps=0)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_parametric_activation_in_half_precision_matches_fp32(dtype, tol):
    torch.manual_seed(0)
    layer = ProxyNormAct(4, nn.PReLU(4))
    with torch.no_grad():
        layer.activation.weight.copy_(torch.tensor([0.1, 0.25, -0.2, 0.5]))
        layer.bias.copy_(torch.tensor([0.0, 0.3, -0.5, 1.0]))
        layer.proxy_weight.copy_(torch.tensor([0.0, 0.1, -0.2, 0.3]))
    x = torch.randn(2, 4, 3, 3)
    reference = layer(x).detach()
    half = copy.deepcopy(layer).to(dtype)
    out = half(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert float((out.float() - reference).abs().max() / reference.abs().max()) < tol
    out.float().square().sum().backward()  # gradients reach the half-precision PReLU weight
    assert half.activation.weight.grad is not None and half.activation.weight.grad.dtype == dtype
    mean, var = half.proxy_moments()
    ref_mean, ref_var = layer.proxy_moments()
    torch.testing.assert_close(mean, ref_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(var, ref_var, rtol=tol, atol=tol)


def test_input_and_argument_validation():
    layer = ProxyNormAct(4, nn.ReLU())
    with pytest.raises(ValueError, match="rank >= 2"):
        layer(torch.randn(4))
    assert layer(torch.randn(3, 4)).shape == (3, 4)
    with pytest.raises(ValueError, match="num_channels"):
        ProxyNormAct(True, nn.ReLU())
    for bad in (200.5, 1, True):
        with pytest.raises(ValueError, match="num_samples"):
            ProxyNormAct(4, nn.ReLU(), num_samples=bad)
    # the rank check does not get in torch.fx's way: traced, the model still runs and still checks
    traced = torch.fx.symbolic_trace(nn.Sequential(nn.Identity(), ProxyNormAct(4, nn.ReLU())))
    x = torch.randn(2, 4, 5)
    torch.testing.assert_close(traced(x), layer(x))
    with pytest.raises(ValueError, match="rank >= 2"):
        traced(torch.randn(4))
    # dtype rule (documented): the output follows torch type promotion of the input with the parameters
    assert layer(torch.randn(2, 4, 3).bfloat16()).dtype == torch.float32
