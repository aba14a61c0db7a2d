"""Gradient accumulation that keeps the normalization batch size: the accumulated gradient (and, with
match_ema, the running statistics) equal the big-batch ones of the Ghost BN model with the matching
virtual batch size."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_error
from torch import nn

import normfx
from normfx import models
from normfx.accumulate import accumulate_gradients, ema_horizon, split_batch
from normfx.errors import InputDataError, PolicyError


def net():
    torch.manual_seed(2)
    # no bias before a BN: its gradient is zero up to rounding, nothing to compare
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 8, 3, bias=False), nn.BatchNorm2d(8, momentum=0.3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10, bias=False), nn.BatchNorm1d(10))
    models.randomize_batchnorm(model, 4)
    return model.train()


def batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, 1, 6, 6), generator=g) * 1.2 + 0.3, torch.randint(0, 10, (n,), generator=g)


def loss_fn(model):
    return lambda b: F.cross_entropy(model(b[0]), b[1])


@pytest.mark.parametrize("n_total, micro", [(16, 4), (14, 4), (12, 3)])
def test_accumulated_gradient_is_the_ghost_bn_big_batch_gradient(n_total, micro):
    model = net()
    ghost = normfx.rewrite(model, f"ghost:virtual_batch_size={micro}").train()
    plain = copy.deepcopy(model)
    x, y = batch(n_total)
    big_loss = F.cross_entropy(ghost(x), y)
    big_loss.backward()
    acc_loss = accumulate_gradients(model, split_batch((x, y), micro), loss_fn(model))
    assert rel_error(big_loss, acc_loss) <= 1e-6
    ghost_params = dict(ghost.named_parameters())
    for name, p in model.named_parameters():
        assert rel_error(ghost_params[name].grad, p.grad) <= 1e-5, name
    ghost_state = ghost.state_dict()
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(value, ghost_state[key]), key
        else:
            assert rel_error(ghost_state[key], value) <= 1e-6, key
    assert [m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == [0.1, 0.3, 0.1]
    # negative control: the plain model on the big batch normalizes over all samples — a different gradient
    F.cross_entropy(plain(x), y).backward()
    assert rel_error(plain[0].weight.grad, model[0].weight.grad) > 1e-3


def test_without_match_ema_the_ema_moves_further_per_step():
    model, twin = net(), net()
    micro_batches = split_batch(batch(16), 4)
    accumulate_gradients(model, micro_batches, loss_fn(model), match_ema=False)
    accumulate_gradients(twin, micro_batches, loss_fn(twin))
    reference = net()[1]
    moved = (model[1].running_mean - reference.running_mean).abs().sum()
    moved_matched = (twin[1].running_mean - reference.running_mean).abs().sum()
    assert moved > moved_matched


def test_helpers():
    x, y = batch(10)
    parts = split_batch({"x": x, "y": y}, 4)
    assert [len(p["x"]) for p in parts] == [4, 4, 2] and torch.equal(parts[2]["y"], y[8:])
    assert [len(p) for p in split_batch(x, 5)] == [5, 5]
    model = net()
    with ema_horizon(model, 4):
        assert model[1].momentum == pytest.approx(1 - 0.9 ** 0.25)
    assert model[1].momentum == 0.1
    with pytest.raises(PolicyError, match="size must be an integer >= 1"):
        split_batch(x, 0)
    with pytest.raises(InputDataError, match="no micro-batches"):
        accumulate_gradients(model, [], loss_fn(model))
    with pytest.raises(InputDataError, match="cannot split a str"):
        split_batch("abc", 2)
