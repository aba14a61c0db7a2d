"""Frozen BN: the layer, and the policies frozen / unfrozen / keep on every zoo model."""

import copy
from collections import OrderedDict

import pytest
import torch
from helpers import assert_state_equal, rel_error, snapshot, storages
from torch import nn

import normfx
from normfx import models
from normfx.errors import RewriteError
from normfx.layers import BatchNormPost2d, FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from normfx.layers.foreign import find_foreign


def _random_bn(cls, channels=6, affine=True, eps=1e-3, seed=0):
    bn = cls(channels, affine=affine, eps=eps, momentum=0.03)
    models.randomize_batchnorm(bn, seed)
    return bn.eval()


@pytest.mark.parametrize(
    "bn_cls, frozen_cls, shape",
    [
        (nn.BatchNorm1d, FrozenBatchNorm1d, (4, 6)),
        (nn.BatchNorm1d, FrozenBatchNorm1d, (4, 6, 9)),
        (nn.BatchNorm2d, FrozenBatchNorm2d, (4, 6, 5, 7)),
        (nn.BatchNorm3d, FrozenBatchNorm3d, (2, 6, 3, 4, 5)),
    ],
)
def test_frozen_layer_is_bn_in_eval_and_state_dicts_round_trip(bn_cls, frozen_cls, shape):
    bn = _random_bn(bn_cls)
    x = torch.randn(shape)
    frozen = frozen_cls(6)
    frozen.load_state_dict(bn.state_dict())  # a BN checkpoint loads into Frozen BN
    frozen.eps = bn.eps
    assert torch.equal(frozen(x), bn(x))
    back = bn_cls(6, eps=bn.eps).eval()
    back.load_state_dict(frozen.state_dict())  # ... and back
    assert torch.equal(back(x), bn(x))
    assert list(frozen.state_dict()) == list(bn.state_dict())
    assert not list(frozen.parameters())


def test_from_batchnorm_keeps_eps_momentum_and_shares_no_storage():
    bn = _random_bn(nn.BatchNorm2d, eps=0.02)
    frozen = FrozenBatchNorm2d.from_batchnorm(bn)
    assert frozen.eps == 0.02 and frozen.momentum == 0.03
    assert not storages(frozen) & storages(bn)
    x = torch.randn(2, 6, 3, 3)
    assert torch.equal(frozen(x), bn(x))
    bn2 = frozen.to_batchnorm()
    assert isinstance(bn2, nn.BatchNorm2d) and bn2.eps == 0.02 and bn2.momentum == 0.03
    assert torch.equal(bn2.eval()(x), bn(x))
    scale, shift = frozen.scale_and_shift()
    expected = x.double() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    assert rel_error(expected, frozen(x)) < 1e-6


def test_affine_false_checkpoint_and_version_1_checkpoint_load():
    bn = _random_bn(nn.BatchNorm2d, affine=False)
    frozen = FrozenBatchNorm2d(6, eps=bn.eps)
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(2, 6, 3, 3)
    assert torch.equal(frozen(x), bn(x))
    old = {k: v for k, v in _random_bn(nn.BatchNorm2d).state_dict().items() if k != "num_batches_tracked"}
    old = OrderedDict(old)  # no _metadata: loads as version None, like a pre-versioning checkpoint
    target = FrozenBatchNorm2d(6)
    target.load_state_dict(old)
    assert int(target.num_batches_tracked) == 0


def test_frozen_layer_rejects_wrong_rank():
    with pytest.raises(ValueError, match="expects a 4D input"):
        FrozenBatchNorm2d(3)(torch.randn(2, 3))


class _ScaledBN(nn.BatchNorm2d):
    """A subclass whose forward is not BN + children: must be skipped, not silently mis-frozen."""

    def forward(self, x):
        return super().forward(x) * 2


def test_policy_frozen_handles_subclasses_and_reports_skips():
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3),
        _ScaledBN(6),
        nn.BatchNorm2d(6, track_running_stats=False),
        nn.SyncBatchNorm(6),
    ).eval()
    models.randomize_batchnorm(model, 3)
    report = normfx.explain(model, "frozen")
    by_name = {e.name: e for e in report.entries}
    assert by_name["1"].status == "skipped" and "cannot freeze it generically" in by_name["1"].reason
    assert by_name["2"].status == "skipped" and "track_running_stats=False" in by_name["2"].reason
    assert by_name["3"].status == "applied"
    frozen = normfx.rewrite(model, "frozen")
    assert isinstance(frozen[3], FrozenBatchNorm) and type(frozen[1]) is _ScaledBN
    x = torch.randn(2, 3, 8, 8)
    assert rel_error(model(x), frozen(x)) <= 1e-6
    with pytest.raises(RewriteError, match="strict=True and 2 layer"):
        normfx.rewrite(model, "frozen", strict=True)
    unfrozen = normfx.rewrite(frozen, "unfrozen")
    assert type(unfrozen[3]) is nn.SyncBatchNorm


@pytest.mark.parametrize("name", models.names())
def test_frozen_and_unfrozen_are_exact_on_the_zoo(name):
    model = models.create(name, seed=1)
    x = models.example_input(name, batch=2, seed=1)
    before = snapshot(model)
    with torch.no_grad():
        y = model(x)
    frozen, report = normfx.rewrite_with_report(model, "frozen")
    assert_state_equal(before, model)  # the input model is untouched
    assert not storages(frozen) & storages(model)  # nothing aliased
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in frozen.modules())
    assert len(report.applied) == sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    with torch.no_grad():
        assert rel_error(y, frozen(x)) <= 1e-6
    unfrozen = normfx.rewrite(frozen, "unfrozen")
    assert not any(isinstance(m, FrozenBatchNorm) for m in unfrozen.modules())
    with torch.no_grad():
        assert rel_error(y, unfrozen(x)) <= 1e-6
    # state_dict keys kept; other libraries' frozen BNs (no counter) become trainable BN with num_batches_tracked
    counters = {f"{path}.num_batches_tracked" for path in find_foreign(model)}
    assert set(unfrozen.state_dict()) == set(model.state_dict()) | counters
    for key, value in model.state_dict().items():
        assert torch.equal(unfrozen.state_dict()[key], value), key


def test_bn_act_subclass_keeps_its_activation_through_freeze_and_unfreeze():
    model = models.create("trap_bn_act")
    x = models.example_input("trap_bn_act", batch=2)
    frozen = normfx.rewrite(model, "frozen")
    posts = [m for m in frozen.modules() if isinstance(m, FrozenBatchNorm) and m.post_names]
    assert posts, "the BN+act subclass must keep its activation"
    assert rel_error(model(x), frozen(x)) <= 1e-6
    unfrozen = normfx.rewrite(frozen, "unfrozen")
    assert any(isinstance(m, BatchNormPost2d) for m in unfrozen.modules())
    assert rel_error(model(x), unfrozen(x)) <= 1e-6


def test_unfrozen_layers_train_again():
    model = models.create("resnet18")
    frozen = normfx.rewrite(model, "frozen")
    unfrozen = normfx.rewrite(frozen, "unfrozen").train()
    trainable = [p for m in unfrozen.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    assert trainable and all(p.requires_grad for p in trainable)


def test_overrides_freeze_only_matching_layers():
    model = models.create("resnet18")
    bn_names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    first = bn_names[0]
    report = normfx.explain(model, {first: "frozen", "*": "keep"})
    statuses = {e.name: (e.rule, e.status) for e in report.entries}
    assert statuses[first] == ("frozen", "applied")
    assert all(statuses[n] == ("keep", "kept") for n in bn_names[1:])
    result = normfx.rewrite(model, {first: "frozen"})
    assert isinstance(result.get_submodule(first), FrozenBatchNorm2d)
    assert sum(isinstance(m, FrozenBatchNorm) for m in result.modules()) == 1
    unmatched = normfx.explain(model, {first: "frozen"})
    assert {e.reason for e in unmatched.entries if e.name != first} == {"no policy step matches this layer"}


def test_a_model_that_is_a_single_bn():
    bn = _random_bn(nn.BatchNorm2d)
    frozen = normfx.rewrite(bn, "frozen")
    assert isinstance(frozen, FrozenBatchNorm2d)
    x = torch.randn(2, 6, 3, 3)
    assert torch.equal(frozen(x), bn(x))
    assert copy.deepcopy(frozen)(x).shape == x.shape


def test_affine_false_bn_round_trips_through_frozen():
    bn = _random_bn(nn.BatchNorm2d, affine=False)
    frozen = FrozenBatchNorm2d.from_batchnorm(bn)
    assert not frozen.affine and set(frozen.state_dict()) == set(bn.state_dict())
    back = nn.BatchNorm2d(6, affine=False)
    back.load_state_dict(frozen.state_dict())
    x = torch.randn(2, 6, 3, 3)
    assert torch.equal(frozen(x), bn(x))
    model = nn.Sequential(nn.Conv2d(3, 6, 1), bn).eval()
    again = normfx.rewrite(model, ["frozen", "unfrozen"])
    assert again[1].affine is False and set(again.state_dict()) == set(model.state_dict())


def test_explain_equals_rewrite_for_a_sequence():
    model = models.create("resnet18")
    _, report = normfx.rewrite_with_report(model, ["frozen", "unfrozen"])
    explained = normfx.explain(model, ["frozen", "unfrozen"])
    assert [(e.name, e.rule, e.status) for e in explained.entries] == [(e.name, e.rule, e.status) for e in report.entries]
    assert len(report.applied) == 40
