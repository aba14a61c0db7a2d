"""Policies ghost / virtual / sync / renorm / separate (and back: batchnorm, unsync) over the zoo: exact in eval
mode against the BN they replace (randomized statistics), state_dict keys kept and loadable both ways where the
shapes allow, declined layers reported with their reason, bad options as one-line typed errors."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import rel_error, storages
from torch import nn

import normfx
from normfx import models
from normfx.errors import PolicyError
from normfx.layers import (
    BatchRenorm2d,
    FrozenBatchNorm2d,
    GhostBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    SeparateBatchNorm,
    SyncBatchNorm,
    VirtualBatchNorm,
)

STEPS = {
    "ghost:virtual_batch_size=2": GhostBatchNorm,
    "virtual:reference_size=4": VirtualBatchNorm,
    "sync": nn.SyncBatchNorm,
    "renorm:r_max=2,d_max=1": nn.modules.batchnorm._BatchNorm,
    "separate:num_domains=3": SeparateBatchNorm,
}
MODELS = ("resnet18", "mobilenet_v2", "conv1d", "conv3d", "mlp", "trap_shared_bn", "trap_untraceable", "trap_syncbn")
STANDARD = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def bn_names(model):
    return [n for n, m in model.named_modules() if type(m) in STANDARD]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("step", list(STEPS))
def test_exact_in_eval_with_keys_kept(name, step):
    model = models.create(name, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = models.example_input(name, batch=3, seed=1)
    out, report = normfx.rewrite_with_report(model, step)
    assert sorted(e.name for e in report.applied) == sorted(bn_names(model)) and not report.skipped
    assert not any(type(m) in STANDARD and not isinstance(m, SyncBatchNorm) for m in out.modules())
    for entry in report.applied:
        assert isinstance(out.get_submodule(entry.name), STEPS[step]), entry.name
    with torch.no_grad():
        assert rel_error(model(x), out.eval()(x)) == 0.0  # eval mode: BatchNorm's kernel on the same numbers
    assert list(out.state_dict()) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])  # the caller's model untouched
    assert not storages(out) & storages(model)
    fresh = normfx.rewrite(models.create(name, seed=9), step)
    fresh.load_state_dict(model.state_dict())  # BN checkpoint → variant (Separate: every domain)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))
    if not step.startswith("separate"):
        back = models.create(name, seed=9)
        back.load_state_dict(out.state_dict())  # variant checkpoint → BN: same keys, same shapes
        with torch.no_grad():
            assert torch.equal(back(x), model(x))


@pytest.mark.parametrize("step", list(STEPS))
def test_batchnorm_policy_brings_every_variant_back(step):
    model = models.create("trap_syncbn", seed=3)
    x = models.example_input("trap_syncbn", batch=2)
    variant = normfx.rewrite(model, step)
    back, report = normfx.rewrite_with_report(variant, "batchnorm", example_inputs=x)
    assert [type(m) for m in back.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == \
        [nn.BatchNorm2d] * len(bn_names(model))
    assert len(report.applied) == len(bn_names(model))
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_separate_comes_back_with_the_chosen_domain():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    models.randomize_batchnorm(model, 0)
    sep = normfx.rewrite(model, "separate:num_domains=2,shared_affine=false")
    with torch.no_grad():
        sep[1].running_mean[1].add_(1.0)
        sep[1].weight[1].mul_(2.0)
    back, report = normfx.rewrite_with_report(sep, "batchnorm:domain=1")
    assert report.applied[0].details["domain"] == 1
    assert torch.equal(back[1].running_mean, sep[1].running_mean[1]) and torch.equal(back[1].weight, sep[1].weight[1])
    with pytest.raises(PolicyError, match="domain=5 but layer 1 has 2 domains"):
        normfx.rewrite(sep, "batchnorm:domain=5")


def test_training_mode_changes_as_designed():
    model = models.create("resnet18", seed=3).train()
    x = models.example_input("resnet18", batch=8, seed=1)
    ghost = normfx.rewrite(model, "ghost:virtual_batch_size=2").train()
    same = normfx.rewrite(model, "ghost:virtual_batch_size=8").train()
    with torch.no_grad():
        reference = copy.deepcopy(model)(x)
        assert rel_error(reference, same(x)) == 0.0  # one virtual batch: BatchNorm
        assert rel_error(reference, ghost(x)) > 1e-2


def test_dimensions_follow_the_batchnorm_class():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm2d(3), nn.BatchNorm3d(3), nn.SyncBatchNorm(3))
    out = normfx.rewrite(model, "ghost:virtual_batch_size=4")
    assert [type(m) for m in out] == [GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, GhostBatchNorm]
    synced = normfx.rewrite(nn.Sequential(nn.SyncBatchNorm(3)), "sync")  # torch's → normfx's (CPU path)
    assert type(synced[0]) is SyncBatchNorm


def test_declined_layers_are_reported_with_their_reason():
    frozen = FrozenBatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), frozen, BatchRenorm2d(4), nn.BatchNorm2d(4))
    out, report = normfx.rewrite_with_report(model, "ghost:virtual_batch_size=4")
    reasons = {e.name: e.reason for e in report.skipped}
    assert "unfreeze it first (policy unfrozen)" in reasons["1"]
    assert "already a BatchRenorm2d; turn it back into BatchNorm first (policy batchnorm)" in reasons["2"]
    assert [e.name for e in report.applied] == ["3"] and type(out[3]) is GhostBatchNorm2d
    _, again = normfx.rewrite_with_report(out, "ghost:virtual_batch_size=4")
    assert [e.status for e in again.entries if e.name == "3"] == ["kept"]
    resized, _ = normfx.rewrite_with_report(out, "ghost:virtual_batch_size=2")
    assert resized[3].virtual_batch_size == 2
    bn_act = models.create("trap_bn_act", seed=0)
    _, report = normfx.rewrite_with_report(bn_act, "ghost:virtual_batch_size=4")
    assert report.skipped and all("BatchNorm subclass with its own forward" in e.reason for e in report.skipped)
    explained = normfx.explain(models.create("resnet18", seed=0), "virtual:reference_size=8")
    assert len(explained.applied) == len(bn_names(models.create("resnet18", seed=0)))


@pytest.mark.parametrize("step, match", [
    ("ghost:virtual_batch_size=0", "virtual_batch_size must be >= 1"),
    ("ghost:virtual_batch_size=-4", "virtual_batch_size must be >= 1"),
    ("virtual:reference_size=0", "reference_size must be >= 1"),
    ("renorm:r_max=0.5", "r_max must be a finite number >= 1"),
    ("renorm:d_max=-0.1", "d_max must be a finite number >= 0"),
    ("separate:num_domains=0", "num_domains must be >= 1"),
    ("ghost:virtual_batch_size=two", "expects int"),
    ("sync:size=2", "unknown option"),
])
def test_bad_options_are_one_line_typed_errors(step, match):
    with pytest.raises(PolicyError, match=match) as info:
        normfx.rewrite(models.create("mlp", seed=0), step)
    assert "\n" not in str(info.value)
