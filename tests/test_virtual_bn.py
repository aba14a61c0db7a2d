"""Virtual BN: statistics over batch ∪ reference (fixed, or recent inputs), no gradient into the reference,
BatchNorm in eval, the reference's cost reported."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import rel_error
from torch import nn

import normfx
from normfx import models
from normfx.errors import InputDataError, PolicyError
from normfx.layers import VirtualBatchNorm, VirtualBatchNorm1d, VirtualBatchNorm2d, capture_reference

TOL = 1e-6


def pair(cls=VirtualBatchNorm2d, bn_cls=nn.BatchNorm2d, reference_size=6, mode="recent", seed=0):
    bn = bn_cls(5, eps=1e-3, momentum=0.2)
    models.randomize_batchnorm(bn, seed)
    return bn.train(), cls.from_batchnorm(bn, reference_size, mode).train()


def data(n, shape=(5, 3, 3), seed=1, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g) * 1.5 + 0.4 + shift


def batchnorm_on_union(bn, x, ref, w):
    """BatchNorm over cat(x, ref) with ref detached; the loss only on the batch's rows."""
    x = x.clone().requires_grad_()
    y = bn(torch.cat([x, ref.detach()]))[: len(x)]
    (y * w).sum().backward()
    return y.detach(), x.grad, bn.weight.grad.clone(), bn.bias.grad.clone()


def run(layer, x, w):
    x = x.clone().requires_grad_()
    y = layer(x)
    (y * w).sum().backward()
    return y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


@pytest.mark.parametrize("cls, bn_cls, shape", [(VirtualBatchNorm2d, nn.BatchNorm2d, (5, 3, 3)),
                                                 (VirtualBatchNorm1d, nn.BatchNorm1d, (5,))])
def test_fixed_reference_is_batchnorm_on_the_union_without_gradient_into_it(cls, bn_cls, shape):
    bn, vbn = pair(cls, bn_cls, mode="fixed")
    x, ref = data(4, shape), data(6, shape, seed=2, shift=1.0).requires_grad_()
    vbn.set_reference(ref)
    assert not vbn.reference.requires_grad and "reference" not in vbn.state_dict()
    w = torch.randn_like(x)
    for name, a, b in zip(("output", "grad x", "grad weight", "grad bias"), batchnorm_on_union(bn, x, ref, w),
                          run(vbn, x, w)):
        assert rel_error(a, b) <= TOL, name
    assert rel_error(bn.running_mean, vbn.running_mean) <= TOL and rel_error(bn.running_var, vbn.running_var) <= TOL
    assert vbn.last_reference_samples == 6 and ref.grad is None
    # negative control: plain BatchNorm on the batch alone is clearly different
    plain = copy.deepcopy(pair(cls, bn_cls)[0])
    assert rel_error(plain(x), run(vbn, x, w)[0]) > 1e-2


def test_recent_reference_is_a_fifo_of_past_inputs():
    bn, vbn = pair(reference_size=6)
    x1, x2, x3 = data(4, seed=1), data(4, seed=2), data(4, seed=3)
    w = torch.randn_like(x1)
    ref_bn = copy.deepcopy(bn)
    assert rel_error(run(ref_bn, x1, w)[0], run(vbn, x1, w)[0]) <= TOL  # empty reference at first: BatchNorm
    assert vbn.last_reference_samples == 0 and torch.equal(vbn.reference, x1)
    state = nn.BatchNorm2d(5, eps=1e-3, momentum=0.2)
    state.load_state_dict(vbn.state_dict())
    expected = batchnorm_on_union(state, x2, x1, w)  # a BN with the layer's state, over batch ∪ x1
    assert rel_error(expected[0], run(vbn, x2, w)[0]) <= TOL
    assert vbn.last_reference_samples == 4 and torch.equal(vbn.reference, torch.cat([x2, x1[:2]]))  # newest first
    run(vbn, x3, w)
    assert vbn.last_reference_samples == 6 and torch.equal(vbn.reference, torch.cat([x3, x2[:2]]))
    vbn(data(2, shape=(5, 4, 4)))  # another spatial size: the buffer starts over
    assert vbn.last_reference_samples == 0 and vbn.reference.shape == (2, 5, 4, 4)


def test_eval_is_batchnorm_and_state_dicts_load_both_ways():
    bn, vbn = pair()
    vbn(data(4))
    vbn.load_state_dict(bn.state_dict())
    bn.eval(), vbn.eval()
    x = data(3, seed=7)
    assert torch.equal(vbn(x), bn(x))
    back = nn.BatchNorm2d(5, eps=1e-3).eval()
    back.load_state_dict(vbn.state_dict())
    assert torch.equal(back(x), bn(x)) and list(vbn.state_dict()) == list(bn.state_dict())


def test_capture_reference_sets_every_layer_and_updates_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 5, 1), nn.BatchNorm2d(5))
    models.randomize_batchnorm(model, 1)
    model = normfx.rewrite(model, {"1": "virtual:reference_size=8", "*": "keep"}).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference_input = data(8, shape=(3, 6, 6), seed=5)
    assert capture_reference(model, reference_input) == 1
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # no EMA moved, in the VBN nor in the plain BN
    layer = model[1]
    assert layer.reference_mode == "fixed" and torch.equal(layer.reference, model[0](reference_input).detach())
    x = data(4, shape=(3, 6, 6), seed=6)
    model(x)
    assert layer.last_reference_samples == 8 and torch.equal(layer.reference, model[0](reference_input).detach())
    with pytest.raises(InputDataError, match="no VirtualBatchNorm"):
        capture_reference(nn.Sequential(nn.BatchNorm2d(3)), reference_input)
    with pytest.raises(InputDataError, match="fixed reference has per-sample shape"):
        model(data(4, shape=(3, 8, 8)))


def test_policy_reports_the_cost_and_bad_options_are_typed_errors():
    model = models.create("resnet18", seed=0)
    out, report = normfx.rewrite_with_report(model, "virtual:reference_size=16")
    assert len(report.applied) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(e.details["reference_size"] == 16 for e in report.applied)
    assert any("N + 16 samples" in note for note in report.notes)
    with pytest.raises(PolicyError, match="reference_size must be >= 1"):
        normfx.rewrite(model, "virtual:reference_size=0")
    with pytest.raises(PolicyError, match="reference_size must be an integer >= 1"):
        VirtualBatchNorm(4, 0)
    with pytest.raises(PolicyError, match="reference must be one of"):
        VirtualBatchNorm(4, 2, reference="old")
    with pytest.raises(InputDataError, match="channels"):
        VirtualBatchNorm2d(4, 2).set_reference(torch.randn(2, 3, 2, 2))
