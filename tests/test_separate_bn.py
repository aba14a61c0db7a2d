"""Separate BN: per-domain statistics (each domain is a BatchNorm trained on its batches only), shared or
per-domain affine, the domain by argument or context, BatchNorm checkpoints in and out."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normfx
from normfx import models
from normfx.errors import InputDataError, PolicyError
from normfx.layers import SeparateBatchNorm, SeparateBatchNorm1d, SeparateBatchNorm2d, use_domain


def random_bn(momentum=0.1, seed=0):
    bn = nn.BatchNorm2d(5, eps=1e-3, momentum=momentum)
    models.randomize_batchnorm(bn, seed)
    return bn.train()


def batch(seed, shift):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((4, 5, 3, 3), generator=g) * (1 + shift) + shift


@pytest.mark.parametrize("momentum", [0.1, None])
def test_each_domain_is_a_batchnorm_trained_on_its_own_batches(momentum):
    bn = random_bn(momentum)
    sep = SeparateBatchNorm2d.from_batchnorm(bn, num_domains=3)
    refs = [copy.deepcopy(bn) for _ in range(3)]
    schedule = [0, 2, 0, 0, 2]  # domain 1 never trains
    for step, d in enumerate(schedule):
        x = batch(step, shift=d)
        assert torch.equal(sep(x, domain=d), refs[d](x))
    for d in range(3):
        assert torch.equal(sep.running_mean[d], refs[d].running_mean)
        assert torch.equal(sep.running_var[d], refs[d].running_var)
        assert int(sep.num_batches_tracked[d]) == int(refs[d].num_batches_tracked)
    assert torch.equal(sep.running_mean[1], bn.running_mean)  # untouched domain keeps the BN's statistics
    sep.eval()
    for d in range(3):
        refs[d].eval()
        x = batch(10 + d, shift=0.5)
        assert torch.equal(sep(x, domain=d), refs[d](x))


def test_domain_by_context_inside_a_model_and_restored():
    bn = random_bn()
    model = nn.Sequential(nn.Conv2d(5, 5, 1), bn, nn.ReLU())
    rewritten = normfx.rewrite(model, "separate:num_domains=2")
    layer = rewritten[1]
    assert isinstance(layer, SeparateBatchNorm2d) and layer.domain == 0
    x = batch(1, shift=1.0)
    with use_domain(rewritten, 1):
        assert layer.domain == 1
        rewritten(x)
        with use_domain(rewritten, 0):
            assert layer.domain == 0
        assert layer.domain == 1
    assert layer.domain == 0
    assert int(layer.num_batches_tracked[1]) == int(bn.num_batches_tracked) + 1
    assert int(layer.num_batches_tracked[0]) == int(bn.num_batches_tracked)
    with pytest.raises(RuntimeError, match="boom"), use_domain(rewritten, 1):
        raise RuntimeError("boom")
    assert layer.domain == 0


def test_shared_and_separate_affine():
    bn = random_bn()
    shared = SeparateBatchNorm2d.from_batchnorm(bn, 2, shared_affine=True)
    separate = SeparateBatchNorm2d.from_batchnorm(bn, 2, shared_affine=False)
    assert shared.weight.shape == (5,) and separate.weight.shape == (2, 5)
    assert torch.equal(separate.weight[1], bn.weight) and torch.equal(separate.bias[0], bn.bias)
    x = batch(3, shift=0.3)
    (separate(x, domain=1) * torch.randn_like(x)).sum().backward()
    assert separate.weight.grad[0].abs().max() == 0 and separate.weight.grad[1].abs().max() > 0
    (shared(x, domain=1) * torch.randn_like(x)).sum().backward()
    assert shared.weight.grad.abs().max() > 0


def test_batchnorm_checkpoints_load_in_and_one_domain_comes_back_out():
    bn = random_bn().eval()
    sep = SeparateBatchNorm2d(5, 3, eps=1e-3, shared_affine=False).eval()
    sep.load_state_dict(bn.state_dict())
    assert list(sep.state_dict()) == list(bn.state_dict())
    x = batch(4, shift=0.2)
    for d in range(3):
        assert torch.equal(sep(x, domain=d), bn(x))
    with torch.no_grad():
        sep.running_mean[2].add_(0.5)
    back = sep.to_batchnorm(2)
    assert type(back) is nn.BatchNorm2d and torch.equal(back.running_mean, sep.running_mean[2])
    assert torch.equal(back.eval()(x), sep(x, domain=2))
    assert type(SeparateBatchNorm(5, 2).to_batchnorm(0)) is nn.SyncBatchNorm  # dimension-agnostic form


def test_errors_are_one_line_and_typed():
    sep = SeparateBatchNorm1d(4, 2)
    for bad in (2, -1, 1.0):
        with pytest.raises(InputDataError, match=r"domain must be an integer in \[0, 2\)") as info:
            sep(torch.randn(3, 4), domain=bad)
        assert "\n" not in str(info.value)
    with pytest.raises(PolicyError, match="num_domains must be an integer >= 1"):
        SeparateBatchNorm2d(4, 0)
    with pytest.raises(PolicyError, match="nothing to separate"):
        SeparateBatchNorm2d(4, 2, track_running_stats=False)
    with pytest.raises(PolicyError, match="num_domains must be >= 1"):
        normfx.rewrite(models.create("resnet18", seed=0), "separate:num_domains=0")
    with pytest.raises(InputDataError, match="no SeparateBatchNorm"):
        with use_domain(nn.Sequential(nn.BatchNorm2d(3)), 1):
            pass
