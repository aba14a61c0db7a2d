"""Frozen BNs of other libraries (torchvision, detectron2, timm, any module with that forward): recognized by
behaviour, folded by ``fuse``, listed by ``explain``, made trainable by ``unfrozen``; lookalikes are reported."""

from __future__ import annotations

import collections

import pytest
import torch
from helpers import assert_state_equal, fx_calls, rel_error, snapshot, storages
from torch import fx, nn

import normfx
from normfx import models
from normfx.layers import FrozenBatchNorm1d, FrozenBatchNorm2d, is_batchnorm
from normfx.layers.foreign import find_foreign, is_candidate, recognize
from normfx.models.foreign_frozen import (
    Detectron2FrozenBatchNorm2d,
    TimmFrozenBatchNormAct2d,
    TorchvisionFrozenBatchNorm2d,
)

NAME = "trap_foreign_frozen"
FOREIGN = {"TorchvisionFrozenBatchNorm2d", "Detectron2FrozenBatchNorm2d", "TimmFrozenBatchNormAct2d"}


def _randomized(module: nn.Module, seed: int = 3) -> nn.Module:
    models.randomize_batchnorm(module, torch.Generator().manual_seed(seed))
    return module.eval()


def _foreign_paths(model: nn.Module) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules() if type(m).__name__ in FOREIGN}


class _Eps0Lookalike(TorchvisionFrozenBatchNorm2d):
    """Forgets eps: ``w * rsqrt(rv)`` (a ~eps/var relative difference)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = (self.weight * self.running_var.rsqrt()).reshape(1, -1, 1, 1)
        return x * scale + (self.bias - self.running_mean * self.weight * self.running_var.rsqrt()).reshape(1, -1, 1, 1)


class _ClampLookalike(TorchvisionFrozenBatchNorm2d):
    """The affine, then a clamp it does not register as a child."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).clamp(-1.0, 1.0)


class _GenericFrozen1d(nn.Module):
    """Someone's own frozen BN for (N, C): ``(x - rm) / sqrt(rv + eps) * w + b``, buffers named as BN's."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.eps = 1e-3
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((channels,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.running_mean) / torch.sqrt(self.running_var + self.eps) * self.weight + self.bias


# --------------------------------------------------------------------------------------------------- recognition


@pytest.mark.parametrize("cls", [TorchvisionFrozenBatchNorm2d, Detectron2FrozenBatchNorm2d, TimmFrozenBatchNormAct2d])
def test_each_library_layer_is_recognized_with_its_children_as_post(cls):
    layer = _randomized(cls(6))
    match = recognize(layer)
    assert match.frozen is not None and not match.reason
    assert type(match.frozen) is FrozenBatchNorm2d and match.source == cls.__name__
    assert match.frozen.post_names == tuple(name for name, _ in layer.named_children())
    x = torch.randn(2, 6, 4, 4)
    assert rel_error(layer(x), match.frozen(x)) <= 1e-6
    assert not set(storages(layer)) & storages(match.frozen)


def test_generic_module_with_the_formula_is_recognized_on_2d_input():
    layer = _randomized(_GenericFrozen1d(5))
    match = recognize(layer)
    assert type(match.frozen) is FrozenBatchNorm1d


@pytest.mark.parametrize("cls, fragment", [
    (_Eps0Lookalike, "its forward differs from x * (w * rsqrt(rv + eps)) + (b - rm * scale) by"),
    (_ClampLookalike, "its forward differs from"),
])
def test_lookalike_is_not_matched_and_says_why(cls, fragment):
    layer = _randomized(cls(6))
    assert is_candidate(layer)
    match = recognize(layer)
    assert match.frozen is None
    assert match.reason.startswith(f"lookalike {cls.__name__} not matched as a frozen BatchNorm") and fragment in match.reason


def test_torch_and_normfx_batchnorms_and_other_modules_are_no_candidates():
    assert not is_candidate(nn.BatchNorm2d(3)) and not is_candidate(FrozenBatchNorm2d(3))
    assert not is_candidate(nn.GroupNorm(1, 3)) and not is_candidate(nn.Conv2d(3, 3, 1))
    layer = TorchvisionFrozenBatchNorm2d(3)
    del layer.eps
    assert not is_candidate(layer)


# --------------------------------------------------------------------------------------------------- fuse / explain


def test_fuse_folds_every_foreign_layer_and_explain_lists_them():
    model = models.create(NAME, seed=1)
    x = models.example_input(NAME, batch=2, seed=1)
    foreign = _foreign_paths(model)
    assert len(foreign) == 11 and set(foreign.values()) == FOREIGN
    before, owned = snapshot(model), storages(model)
    with torch.no_grad():
        y = model(x)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    assert_state_equal(before, model) and not storages(fused) & owned  # the caller's model untouched
    assert {e.name: e.details["foreign"] for e in report.applied} == foreign and not report.skipped
    with torch.no_grad():
        assert rel_error(y, fused(x)) <= 1e-5
    # nothing left of them: no mul/sub/rsqrt/batch_norm, only the two residual additions; fully traced now
    ops = fx_calls(fused, by_name=True)
    assert isinstance(fused, fx.GraphModule)
    assert not {"mul", "sub", "rsqrt", "batch_norm", "reshape", "Identity", "Sequential"} & set(ops)
    assert ops["add"] == 2
    assert not any(is_batchnorm(m) or is_candidate(m) for m in fused.modules())
    assert not any(k.endswith(("running_mean", "running_var")) for k in fused.state_dict())
    explained = normfx.explain(model, "fuse", example_inputs=x)
    assert [(e.name, e.status, e.details.get("foreign")) for e in explained.entries] == [
        (e.name, e.status, e.details.get("foreign")) for e in report.entries]


def test_exported_onnx_has_no_elementwise_op_left_from_them():
    model = models.create(NAME)
    x = models.example_input(NAME, batch=2)
    result = normfx.export(model, x, None, policy="fuse")
    assert result.verification.ok if hasattr(result.verification, "ok") else True
    ops = collections.Counter(node.op_type for node in result.model.graph.node)
    assert ops["BatchNormalization"] == 0
    assert not {"Mul", "Sub", "Div", "Sqrt", "Reciprocal"} & set(ops)
    assert ops["Add"] == 2  # the residual sums
    assert ops["Conv"] == 11


def test_activation_parameters_keep_their_key():
    model = _randomized(nn.Sequential(nn.Conv2d(3, 4, 3), TimmFrozenBatchNormAct2d(4, act_layer=lambda inplace: nn.PReLU(4))))
    with torch.no_grad():
        model[1].act.weight.uniform_(0.1, 0.4)
    x = torch.randn(2, 3, 8, 8)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    assert [e.details["foreign"] for e in report.applied] == ["TimmFrozenBatchNormAct2d"]
    assert set(fused.state_dict()) == {"0.weight", "0.bias", "1.act.weight"}
    assert fx_calls(fused, by_name=True)["PReLU"] == 1 and rel_error(model(x), fused(x)) <= 1e-5


def test_lookalike_is_reported_skipped_and_left_working():
    model = _randomized(nn.Sequential(nn.Conv2d(3, 4, 3), _Eps0Lookalike(4), nn.ReLU(),
                                      nn.Conv2d(4, 4, 1), TorchvisionFrozenBatchNorm2d(4)))
    x = torch.randn(2, 3, 8, 8)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    # not matched as a frozen BN (reported skipped), yet what its forward computes — a per-channel x * s + t on
    # constants — still folds into the conv before it by the affine-chain rule, exactly as it is written
    assert [(e.name, e.status, e.details.get("fold")) for e in report.entries] == [
        ("1", "skipped", None), ("1.mul", "applied", "affine_chain"), ("4", "applied", None)]
    assert "lookalike _Eps0Lookalike not matched" in report.entries[0].reason
    assert rel_error(model(x), fused(x)) <= 1e-5 and not {"mul", "add", "rsqrt"} & set(fx_calls(fused, by_name=True))
    clamped = _randomized(nn.Sequential(nn.Conv2d(3, 4, 3), _ClampLookalike(4)))
    fused, report = normfx.rewrite_with_report(clamped, "fuse")
    assert report.entries[0].status == "skipped" and "differs" in report.entries[0].reason
    assert rel_error(clamped(x), fused(x)) <= 1e-5
    with pytest.raises(normfx.errors.NormfxError):
        normfx.rewrite(model, "fuse", strict=True)


def test_generic_1d_frozen_bn_folds_into_the_linear_before_it():
    model = _randomized(nn.Sequential(nn.Linear(6, 5), _GenericFrozen1d(5), nn.ReLU(), nn.Linear(5, 2)))
    x = torch.randn(4, 6)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    assert [(e.name, e.status, e.details["into"]) for e in report.entries] == [("1", "applied", "0")]
    assert rel_error(model(x), fused(x)) <= 1e-5 and not {"sub", "truediv", "sqrt"} & set(fx_calls(fused, by_name=True))


def test_module_registered_twice_is_swapped_at_both_paths():
    bn = TorchvisionFrozenBatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn)
    model.alias = bn
    _randomized(model)
    x = torch.randn(2, 3, 6, 6)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    assert rel_error(model(x), fused(x)) <= 1e-5
    assert {(e.name, e.status) for e in report.entries} == {("1", "applied")}  # as for an aliased nn.BatchNorm2d
    assert not any(is_candidate(m) or is_batchnorm(m) for m in fused.modules())


# --------------------------------------------------------------------------------------------------- unfrozen


def test_unfrozen_gives_trainable_batchnorm_with_equal_eval_outputs():
    model = models.create(NAME, seed=2)
    x = models.example_input(NAME, batch=2, seed=2)
    foreign = _foreign_paths(model)
    before = snapshot(model)
    with torch.no_grad():
        y = model(x)
    unfrozen, report = normfx.rewrite_with_report(model, "unfrozen")
    assert_state_equal(before, model)
    assert {e.name: e.details["foreign"] for e in report.applied} == foreign
    for path in foreign:
        bn = unfrozen.get_submodule(path)
        assert isinstance(bn, nn.BatchNorm2d) and bn.weight.requires_grad and bn.bias.requires_grad
    assert type(unfrozen.get_submodule("stem_bn").act) is nn.ReLU  # timm's activation kept after the BN
    with torch.no_grad():
        assert rel_error(y, unfrozen(x)) <= 1e-6
    # the original keys, plus the counter trainable BN keeps
    counters = {f"{p}.num_batches_tracked" for p in foreign}
    assert set(unfrozen.state_dict()) == set(model.state_dict()) | counters
    unfrozen.load_state_dict(model.state_dict(), strict=False)
    unfrozen.train()
    unfrozen(x).square().mean().backward()
    assert all(unfrozen.get_submodule(p).weight.grad is not None for p in foreign)
    assert set(find_foreign(model)) == set(foreign)
