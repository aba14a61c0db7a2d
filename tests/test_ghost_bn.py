"""Ghost BN: one virtual batch is BatchNorm bit for bit; smaller virtual batches are BatchNorm on each chunk
(outputs and gradients to fp32 rounding; the EMA bit for bit under the rule: every virtual batch updates,
momentum 1 − (1 − m)^(1/k))."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import rel_error
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import normfx
from normfx import models
from normfx.errors import InputDataError, PolicyError
from normfx.layers import GhostBatchNorm, GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from normfx.layers._batch_stats import horizon_momentum
from normfx.layers.ghost import virtual_batch_sizes

TOL = 1e-6
CASES = [(nn.BatchNorm1d, GhostBatchNorm1d, (6,)), (nn.BatchNorm1d, GhostBatchNorm1d, (6, 5)),
         (nn.BatchNorm2d, GhostBatchNorm2d, (6, 4, 3)), (nn.BatchNorm3d, GhostBatchNorm3d, (6, 2, 3, 2))]


def pair(bn_cls, ghost_cls, virtual_batch_size, momentum=0.1, seed=0):
    bn = bn_cls(6, eps=1e-3, momentum=momentum)
    models.randomize_batchnorm(bn, seed)
    return bn.train(), ghost_cls.from_batchnorm(bn, virtual_batch_size).train()


def data(n, shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((n, *shape), generator=g) * 1.7 + 0.4).requires_grad_()


def grads(module, x, weight):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    (y * weight).sum().backward()
    return y.detach(), x.grad, module.weight.grad.clone(), module.bias.grad.clone()


@pytest.mark.parametrize("bn_cls, ghost_cls, shape", CASES)
@pytest.mark.parametrize("virtual", [8, 20])  # = the batch, and larger than it
def test_one_virtual_batch_is_batchnorm_bit_for_bit(bn_cls, ghost_cls, shape, virtual):
    bn, ghost = pair(bn_cls, ghost_cls, virtual)
    x = data(8, shape)
    w = torch.randn_like(x)
    for _ in range(3):  # EMA included, over several steps
        for a, b in zip(grads(bn, x, w), grads(ghost, x, w)):
            assert torch.equal(a, b)
        bn.zero_grad()
        ghost.zero_grad()
    assert list(ghost.state_dict()) == list(bn.state_dict())
    for key, value in bn.state_dict().items():
        assert torch.equal(ghost.state_dict()[key], value), key
    bn.eval(), ghost.eval()
    assert torch.equal(ghost(x), bn(x))


def chunk_reference(bn, x, weight, virtual, momentum):
    """BatchNorm (momentum m') run on each virtual batch separately: outputs, grads, and the BN after it."""
    ref = copy.deepcopy(bn)
    ref.momentum = momentum
    x = x.detach().clone().requires_grad_()
    y = torch.cat([ref(part) for part in torch.split(x, virtual)])
    (y * weight).sum().backward()
    return (y.detach(), x.grad, ref.weight.grad.clone(), ref.bias.grad.clone()), ref


@pytest.mark.parametrize("bn_cls, ghost_cls, shape", CASES)
@pytest.mark.parametrize("n, virtual", [(12, 4), (12, 2), (10, 4), (11, 3)])  # divisible, and a remainder
def test_virtual_batches_are_batchnorm_on_each_chunk(bn_cls, ghost_cls, shape, n, virtual):
    bn, ghost = pair(bn_cls, ghost_cls, virtual)
    x = data(n, shape)
    w = torch.randn_like(x)
    k = len(virtual_batch_sizes(n, virtual))
    expected, ref = chunk_reference(bn, x, w, virtual, horizon_momentum(0.1, k))
    got = grads(ghost, x, w)
    for name, a, b in zip(("output", "grad x", "grad weight", "grad bias"), expected, got):
        assert rel_error(a, b) <= TOL, name  # one kernel over the k chunks: summation order may differ
    # the EMA goes through BatchNorm's own update kernel, chunk by chunk: bit for bit
    assert torch.equal(ref.running_mean, ghost.running_mean) and torch.equal(ref.running_var, ghost.running_var)
    assert int(ghost.num_batches_tracked) == k == int(ref.num_batches_tracked)


def test_ema_rule_against_a_hand_reference_and_its_horizon():
    """The documented rule, in numpy float64: k sequential updates with m' give (1 − m')^k = 1 − m."""
    bn, ghost = pair(nn.BatchNorm2d, GhostBatchNorm2d, 3, momentum=0.2)
    x = data(9, (6, 4, 4))
    mean0, var0 = bn.running_mean.double().numpy().copy(), bn.running_var.double().numpy().copy()
    with torch.no_grad():
        ghost(x)
    k, m = 3, 0.2
    mp = 1.0 - (1.0 - m) ** (1.0 / k)
    assert (1.0 - mp) ** k == pytest.approx(1.0 - m, rel=1e-15)
    chunks = x.detach().double().numpy().reshape(k, 3, 6, 4, 4)
    mu = chunks.mean(axis=(1, 3, 4))
    var = chunks.var(axis=(1, 3, 4), ddof=1)  # running_var keeps the unbiased variance
    weights = np.array([mp * (1 - mp) ** (k - 1 - i) for i in range(k)])
    expected_mean = (1 - mp) ** k * mean0 + weights @ mu
    expected_var = (1 - mp) ** k * var0 + weights @ var
    assert np.abs(ghost.running_mean.double().numpy() - expected_mean).max() <= 1e-6 * np.abs(expected_mean).max()
    assert np.abs(ghost.running_var.double().numpy() - expected_var).max() <= 1e-6 * np.abs(expected_var).max()
    # the horizon: after one forward the initial EMA keeps weight 1 - m, as with one BatchNorm step
    assert weights.sum() == pytest.approx(m, rel=1e-12)


def test_cumulative_average_with_momentum_none_is_over_all_virtual_batches():
    bn, ghost = pair(nn.BatchNorm2d, GhostBatchNorm2d, 2, momentum=None)
    x1, x2 = data(6, (6, 3, 3), seed=2), data(4, (6, 3, 3), seed=3)
    ref = copy.deepcopy(bn)
    with torch.no_grad():
        for x in (x1, x2):
            ghost(x)
            for part in torch.split(x, 2):
                ref(part)
    assert int(ghost.num_batches_tracked) == int(ref.num_batches_tracked) == int(bn.num_batches_tracked) + 5
    assert rel_error(ref.running_mean, ghost.running_mean) <= TOL
    assert rel_error(ref.running_var, ghost.running_var) <= TOL


def test_eval_is_batchnorm_and_state_dicts_load_both_ways():
    bn, ghost = pair(nn.BatchNorm2d, GhostBatchNorm2d, 2)
    bn.eval(), ghost.eval()
    x = data(5, (6, 4, 4))
    assert torch.equal(ghost(x), bn(x))
    fresh = GhostBatchNorm2d(6, 2, eps=1e-3).eval()
    fresh.load_state_dict(bn.state_dict())
    back = nn.BatchNorm2d(6, eps=1e-3).eval()
    back.load_state_dict(fresh.state_dict())
    assert torch.equal(fresh(x), bn(x)) and torch.equal(back(x), bn(x))


def test_a_last_virtual_batch_of_one_value_per_channel_is_a_clear_error():
    _, ghost = pair(nn.BatchNorm1d, GhostBatchNorm1d, 4)
    with pytest.raises(InputDataError, match="last virtual batch of 1 sample") as info:
        ghost(torch.randn(9, 6))
    assert "\n" not in str(info.value)
    before = ghost.state_dict()["running_mean"].clone()
    assert torch.equal(ghost.running_mean, before)
    with pytest.raises(InputDataError, match="virtual_batch_size=1 on input of shape"):
        pair(nn.BatchNorm1d, GhostBatchNorm1d, 1)[1](torch.randn(4, 6))
    _, ghost2d = pair(nn.BatchNorm2d, GhostBatchNorm2d, 4)
    ghost2d(torch.randn(9, 6, 3, 3))  # 1 sample with 9 values per channel: allowed


def test_bad_virtual_batch_sizes_are_one_line_typed_errors():
    for bad in (0, -2, 2.5, True):
        with pytest.raises(PolicyError, match="virtual_batch_size must be an integer >= 1"):
            GhostBatchNorm2d(4, bad)
    model = models.create("resnet18", seed=0)
    with pytest.raises(PolicyError, match="virtual_batch_size must be >= 1") as info:
        normfx.rewrite(model, "ghost:virtual_batch_size=0")
    assert "\n" not in str(info.value)


def test_dimension_agnostic_form_and_repr():
    ghost = GhostBatchNorm(6, 3)
    for shape in ((6, 6), (6, 6, 4), (6, 6, 2, 2), (6, 6, 2, 2, 2)):
        assert ghost(torch.randn(shape)).shape == shape
    with pytest.raises(InputDataError, match="expects a 4D input"):
        GhostBatchNorm2d(6, 3)(torch.randn(6, 6))
    assert "virtual_batch_size=3" in repr(ghost)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 24), virtual=st.integers(1, 12), spatial=st.integers(1, 3), seed=st.integers(0, 99))
def test_property_output_equals_chunked_batchnorm(n, virtual, spatial, seed):
    sizes = virtual_batch_sizes(n, virtual)
    if sizes[-1] * spatial * spatial == 1 or (virtual == 1 and spatial == 1):
        return  # one value per channel: an error by the rule above
    bn, ghost = pair(nn.BatchNorm2d, GhostBatchNorm2d, virtual, seed=seed)
    x = data(n, (6, spatial, spatial), seed=seed)
    w = torch.randn_like(x)
    expected, ref = chunk_reference(bn, x, w, virtual, horizon_momentum(0.1, len(sizes)))
    for a, b in zip(expected, grads(ghost, x, w)):
        assert rel_error(a, b) <= 1e-5
    assert rel_error(ref.running_var, ghost.running_var) <= TOL
