"""Batch Renorm: r_max=1, d_max=0 is BatchNorm; with other limits the gradients match a float64 reference
(r and d stop-gradient and clipped); the warm-up schedule; running statistics as registered buffers."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import rel_error
from torch import nn

import normfx
from normfx import models
from normfx.errors import PolicyError
from normfx.layers import BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from normfx.layers.renorm import renorm_limits

CASES = [(nn.BatchNorm1d, BatchRenorm1d, (6,)), (nn.BatchNorm1d, BatchRenorm1d, (6, 5)),
         (nn.BatchNorm2d, BatchRenorm2d, (6, 4, 3)), (nn.BatchNorm3d, BatchRenorm3d, (6, 2, 3, 2))]


def pair(bn_cls, renorm_cls, seed=0, **options):
    bn = bn_cls(6, eps=1e-3, momentum=0.2)
    models.randomize_batchnorm(bn, seed)
    return bn.train(), renorm_cls.from_batchnorm(bn, **options).train()


def data(n, shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g) * 1.7 + 0.4


def run(module, x, w):
    x = x.clone().requires_grad_()
    y = module(x)
    (y * w).sum().backward()
    out = (y.detach(), x.grad, module.weight.grad.clone(), module.bias.grad.clone())
    module.zero_grad()
    return out


@pytest.mark.parametrize("bn_cls, renorm_cls, shape", CASES)
def test_r_max_1_d_max_0_is_batchnorm_bit_for_bit(bn_cls, renorm_cls, shape):
    bn, renorm = pair(bn_cls, renorm_cls, r_max=1.0, d_max=0.0)
    for step in range(3):
        x = data(8, shape, seed=step)
        w = torch.randn_like(x)
        for name, a, b in zip(("output", "grad x", "grad weight", "grad bias"), run(bn, x, w), run(renorm, x, w)):
            assert torch.equal(a, b), (step, name)
    for key, value in bn.state_dict().items():
        assert torch.equal(renorm.state_dict()[key], value), key
    bn.eval(), renorm.eval()
    x = data(5, shape, seed=9)
    assert torch.equal(renorm(x), bn(x))


def reference64(bn, x, w, r_max, d_max, stop_gradient=True):
    """Batch Renorm written out in float64 from the paper's formulas; returns outputs and grads."""
    dims = [0, *range(2, x.dim())]
    view = (1, -1) + (1,) * (x.dim() - 2)
    x = x.double().clone().requires_grad_()
    gamma = bn.weight.detach().double().clone().requires_grad_()
    beta = bn.bias.detach().double().clone().requires_grad_()
    mu_ema, var_ema = bn.running_mean.double(), bn.running_var.double()
    mu = x.mean(dims)
    sigma = torch.sqrt(((x - mu.view(view)) ** 2).mean(dims) + bn.eps)
    sigma_ema = torch.sqrt(var_ema + bn.eps)
    r = torch.clamp(sigma / sigma_ema, 1 / r_max, r_max)
    d = torch.clamp((mu - mu_ema) / sigma_ema, -d_max, d_max)
    if stop_gradient:
        r, d = r.detach(), d.detach()
    xhat = (x - mu.view(view)) / sigma.view(view) * r.view(view) + d.view(view)
    y = gamma.view(view) * xhat + beta.view(view)
    (y * w.double()).sum().backward()
    clipped_r = ((sigma / sigma_ema > r_max) | (sigma / sigma_ema < 1 / r_max)).detach()
    clipped_d = ((mu - mu_ema).abs() / sigma_ema > d_max).detach()
    return (y.detach(), x.grad, gamma.grad, beta.grad), clipped_r, clipped_d


@pytest.mark.parametrize("bn_cls, renorm_cls, shape", CASES)
@pytest.mark.parametrize("limits", [{}, {"r_max": 1.4, "d_max": 0.5}])  # the defaults (3, 5), and tight limits
def test_gradients_match_a_float64_reference(bn_cls, renorm_cls, shape, limits):
    bn, renorm = pair(bn_cls, renorm_cls, **limits)
    x = data(8, shape) * torch.linspace(0.3, 2.5, 6).view((1, 6) + (1,) * (len(shape) - 1))
    w = torch.randn_like(x)
    r_max, d_max = limits.get("r_max", 3.0), limits.get("d_max", 5.0)
    expected, clipped_r, clipped_d = reference64(bn, x, w, r_max, d_max)
    got = run(renorm, x, w)
    for name, a, b in zip(("output", "grad x", "grad weight", "grad bias"), expected, got):
        assert rel_error(a, b) <= 1e-5, name
    if limits:  # the tight limits clip some channels and not others: both branches are exercised
        assert clipped_r.any() and not clipped_r.all()
        assert clipped_d.any() or clipped_r.any()
    # negative control: without the stop-gradient, the input gradients differ clearly
    without, _, _ = reference64(bn, x, w, r_max, d_max, stop_gradient=False)
    assert rel_error(without[1], got[1]) > 1e-3


def test_warm_up_schedule():
    assert renorm_limits(0, 3.0, 5.0, warmup_steps=2, ramp_steps=4) == (1.0, 0.0)
    assert renorm_limits(1, 3.0, 5.0, warmup_steps=2, ramp_steps=4) == (1.0, 0.0)
    assert renorm_limits(3, 3.0, 5.0, warmup_steps=2, ramp_steps=4) == (1.5, 1.25)
    assert renorm_limits(6, 3.0, 5.0, warmup_steps=2, ramp_steps=4) == (3.0, 5.0)
    assert renorm_limits(0, 3.0, 5.0) == (3.0, 5.0)
    bn, renorm = pair(nn.BatchNorm2d, BatchRenorm2d, r_max=1.4, d_max=0.5, warmup_steps=2, ramp_steps=2)
    bn.num_batches_tracked.zero_()
    renorm.num_batches_tracked.zero_()
    shape = (6, 3, 3)
    x = data(8, shape) * torch.linspace(0.3, 2.5, 6).view(1, 6, 1, 1)
    seen = []
    for step in range(5):
        seen.append(renorm.limits())
        w = torch.randn_like(x)
        ref = copy.deepcopy(renorm)
        got = run(renorm, x, w)
        if step < 2:  # warm-up: BatchNorm
            assert torch.equal(run(bn, x, w)[1], got[1])
        else:
            expected, _, _ = reference64(ref, x, w, *seen[-1])
            assert rel_error(expected[1], got[1]) <= 1e-5
            bn.load_state_dict(renorm.state_dict())
    assert seen == [(1.0, 0.0), (1.0, 0.0), (1.0, 0.0), pytest.approx((1.2, 0.25)), (1.4, 0.5)]


def test_running_statistics_are_registered_buffers_and_state_dicts_match_batchnorm():
    bn, renorm = pair(nn.BatchNorm2d, BatchRenorm2d)
    assert {n for n, _ in renorm.named_buffers()} == {"running_mean", "running_var", "num_batches_tracked"}
    assert list(renorm.state_dict()) == list(bn.state_dict())
    double = copy.deepcopy(renorm).double()
    assert double.running_mean.dtype == torch.float64
    fresh = BatchRenorm2d(6, eps=1e-3)
    fresh.load_state_dict(bn.state_dict())
    back = nn.BatchNorm2d(6, eps=1e-3)
    back.load_state_dict(fresh.state_dict())
    x = data(4, (6, 3, 3))
    assert torch.equal(fresh.eval()(x), bn.eval()(x)) and torch.equal(back.eval()(x), bn(x))
    with torch.no_grad():
        renorm(data(4, (6, 3, 3)))  # training updates them like BatchNorm's
    assert not torch.equal(renorm.running_mean, bn.running_mean)
    assert int(renorm.num_batches_tracked) == int(bn.num_batches_tracked) + 1


def test_bad_options_are_one_line_typed_errors():
    for kwargs, match in (({"track_running_stats": False}, "needs running statistics"), ({"r_max": 0.5}, "r_max"),
                          ({"d_max": -1.0}, "d_max"), ({"warmup_steps": -1}, "warmup_steps"),
                          ({"r_max": float("inf")}, "r_max")):
        with pytest.raises(PolicyError, match=match) as info:
            BatchRenorm(4, **kwargs)
        assert "\n" not in str(info.value)
    model = models.create("resnet18", seed=0)
    for step, match in (("renorm:r_max=0.9", "r_max must be"), ("renorm:d_max=-1", "d_max must be"),
                        ("renorm:ramp_steps=-3", "ramp_steps must be >= 0")):
        with pytest.raises(PolicyError, match=match):
            normfx.rewrite(model, step)


def test_policy_declines_a_batchnorm_without_running_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.BatchNorm2d(4))
    out, report = normfx.rewrite_with_report(model, "renorm")
    (skipped,) = report.skipped
    assert skipped.name == "1" and "track_running_stats=False" in skipped.reason
    assert type(out[1]) is nn.BatchNorm2d and type(out[2]) is BatchRenorm2d
