"""Policy ``fuse`` on batch-independent layers (torch.fx route): ProxyNormAct's constant statistics folded into the
layers around it, StdConv turned into a plain conv; exact in eval, nothing left that could fold, each decision
reported."""

from __future__ import annotations

import copy
import io
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from helpers import assert_state_equal, constant_nodes, randomize_proxy_norm, rel_error, snapshot, storages
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import normfx
from normfx import models
from normfx.errors import RewriteError
from normfx.fold import fold_affine_into_norm, proxy_norm_moments, split_proxy_norm
from normfx.layers import ProxyNormAct, StdConv, StdConv1d, StdConv2d, StdConv3d, is_batchnorm

C = 8
ACTIVATIONS = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "leaky_relu": lambda: nn.LeakyReLU(0.1), "silu": nn.SiLU, "gelu": nn.GELU,
}


# ------------------------------------------------------------------------------------------------------ helpers


def _assert_exact(model: nn.Module, fused: nn.Module, x: torch.Tensor) -> float:
    """Fused fp32 vs the unfused float64 run: within max(1e-5, 2× the unfused fp32 model's own error)."""
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double())
        floor = rel_error(reference, model(x))
        error = rel_error(reference, fused(x))
    assert error <= max(1e-5, 2 * floor), f"fused error {error:.2e} vs fp32 noise {floor:.2e}"
    return error


def _onnx(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17)
    return onnx.load_from_string(buffer.getvalue())


def _ops(proto: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in proto.graph.node if n.op_type not in ("Constant", "Identity"))


def _gn_act_twin(model: nn.Module) -> nn.Module:
    """The same model with GroupNorm (affine) + the plain activation instead of GroupNorm + ProxyNormAct: what
    a GN model costs, the bar for the fused one."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, ProxyNormAct):
            twin.set_submodule(name, module.activation)
        elif isinstance(module, nn.GroupNorm) and not module.affine:
            twin.set_submodule(name, nn.GroupNorm(module.num_groups, module.num_channels, module.eps))
    return twin.eval()


def _left(fused: nn.Module) -> int:
    return sum(isinstance(m, (ProxyNormAct, StdConv)) for m in fused.modules())


def _block(act: str, follower: str, norm: str = "groupnorm") -> nn.Sequential:
    layers = [nn.Conv2d(3, C, 3, padding=1),
              nn.GroupNorm(4, C, affine=False) if norm == "groupnorm" else nn.LayerNorm([C, 8, 8], elementwise_affine=False),
              ProxyNormAct(C, ACTIVATIONS[act]())]
    layers += {
        "conv1x1": [nn.Conv2d(C, 6, 1)],
        "conv3x3": [nn.Conv2d(C, 6, 3, padding=1)],
        "linear_head": [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(C, 6)],
        "output": [],
    }[follower]
    return randomize_proxy_norm(nn.Sequential(*layers), seed=len(act) + len(follower))


# what each (activation, follower) leaves beyond GroupNorm + activation: ONNX ops added / removed
_EXPECTED = {
    ("relu", "conv3x3"): ({"Clip": 1}, {"Relu": 1}), ("relu", "output"): ({"Max": 1}, {"Relu": 1}),
    ("relu6", "conv3x3"): ({"Max": 1, "Min": 1}, {"Clip": 1}), ("relu6", "output"): ({"Max": 1, "Min": 1}, {"Clip": 1}),
    ("leaky_relu", "conv3x3"): ({"Add": 1}, {}), ("leaky_relu", "output"): ({"Add": 1}, {}),
    ("silu", "conv3x3"): ({"Add": 1}, {}), ("silu", "output"): ({"Mul": 1, "Add": 1}, {}),
    ("gelu", "conv3x3"): ({"Add": 1}, {}), ("gelu", "output"): ({"Mul": 1, "Add": 1}, {}),
}


# ------------------------------------------------------------------------------------------------ fold math


_NUMPY_ACTS = {"relu": (lambda v: np.maximum(v, 0), "clamp", (0.0, np.inf)),
               "relu6": (lambda v: np.clip(v, 0, 6), "clamp", (0.0, 6.0)),
               "hardtanh": (lambda v: np.clip(v, -0.5, 2.0), "clamp", (-0.5, 2.0)),
               "leaky_relu": (lambda v: np.where(v > 0, v, 0.1 * v), "homogeneous", None),
               "silu": (lambda v: v / (1 + np.exp(-v)), "other", None)}


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(_NUMPY_ACTS)), st.integers(1, 6), st.integers(0, 2**31 - 1), st.booleans())
def test_split_proxy_norm_is_the_same_function(act, channels, seed, positive_mean):
    fn, form, bounds = _NUMPY_ACTS[act]
    rng = np.random.default_rng(seed)
    w, b = rng.normal(size=channels) * 2, rng.normal(size=channels)
    m, s = rng.normal(size=channels), rng.uniform(0.1, 5, size=channels)
    if positive_mean:
        m = np.abs(m) + 0.05
    y = rng.normal(size=(3, channels, 4)) * 3
    per = lambda v: v[None, :, None]  # noqa: E731
    expected = per(s) * (fn(per(w) * y + per(b)) - per(m))
    modes = [{}]
    if form != "other":
        modes.append({"move_scale": True, "bounds": bounds})
    if form == "clamp":
        modes += [{"bounds": bounds, "absorb_offset": True}, {"move_scale": True, "bounds": bounds, "absorb_offset": True}]
    if form != "other" and positive_mean:
        modes += [{"unit_offset": True, "bounds": bounds, "absorb_offset": form == "clamp"}]
    for mode in modes:
        split = split_proxy_norm(w, b, m, s, **mode)
        a = per(split.pre_scale) * y + per(split.pre_shift)
        z = fn(a) if split.lower is None else np.clip(a, per(split.lower), per(split.upper))  # φ' is the clamp
        got = (z + per(split.offset)) * per(split.scale)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())
        if mode.get("absorb_offset") and mode.get("move_scale"):
            assert split.post_is_identity
        if mode.get("unit_offset") and act == "relu":
            assert np.all(split.lower == -1) and np.all(np.isposinf(split.upper)) and np.all(split.offset == 0)


def test_fold_math_refuses_what_is_not_exact():
    with pytest.raises(RewriteError, match="> 0"):
        split_proxy_norm([1.0], [0.0], [0.0], [-1.0], move_scale=True)
    with pytest.raises(RewriteError, match="mean > 0"):
        split_proxy_norm([1.0], [0.0], [-0.5], [1.0], unit_offset=True)
    with pytest.raises(RewriteError, match="needs bounds"):
        split_proxy_norm([1.0], [0.0], [0.0], [1.0], absorb_offset=True)
    weight, bias = fold_affine_into_norm(None, None, [2.0, 3.0], [1.0, -1.0], shape=(2, 3), like=torch.zeros(1))
    assert weight.shape == (2, 3) and torch.equal(weight[1], torch.full((3,), 3.0)) and torch.equal(bias[0], torch.ones(3))
    layer = ProxyNormAct(4, nn.SiLU())
    mean, inv_std = proxy_norm_moments(layer)
    with torch.no_grad():
        m32, v32 = layer.proxy_moments()
    assert mean.dtype == np.float64 and np.allclose(mean, m32.numpy(), atol=1e-6)
    assert np.allclose(inv_std, 1 / np.sqrt(v32.numpy() + layer.eps), rtol=1e-5)
    assert layer.quantiles.dtype == torch.float32, "the layer itself is not converted"


# ------------------------------------------------------------------------------------------------ positive


@pytest.mark.parametrize("follower", ["conv1x1", "conv3x3", "linear_head", "output"])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_proxy_norm_folds_exactly_and_leaves_only_what_cannot_fold(act, follower):
    model = _block(act, follower)
    x = torch.randn(2, 3, 8, 8)
    before = snapshot(model)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    assert_state_equal(before, model)
    assert not storages(fused) & storages(model)
    _assert_exact(model, fused, x)
    assert _left(fused) == 0
    [entry] = report.entries
    assert entry.name == "2" and entry.status == "applied" and "GroupNorm '1'" in entry.details["pre"]
    added, removed = _EXPECTED.get((act, follower), ({}, {}))
    assert entry.details["leftover_ops"] == sum(added.values()) - sum(removed.values())
    if not added:
        assert entry.details["post"].startswith(("Conv2d", "Linear")), entry.details["post"]
    else:
        assert "zero-padded conv" in entry.reason or "model output" in entry.reason
    fused_proto, twin_proto = _onnx(fused, x), _onnx(_gn_act_twin(model), x)
    assert constant_nodes(fused_proto) == []
    ops, bar = _ops(fused_proto), _ops(twin_proto)
    assert (dict(ops - bar), dict(bar - ops)) == (added, removed)


def test_border_correction_is_used_only_where_the_activation_cannot_take_the_offset():
    x = torch.randn(2, 3, 8, 8)
    for act, post, left in (("relu", "scale into Conv2d '3'; offset absorbed", 0),
                            ("silu", "Conv2d '3' with a border correction", 1)):
        model = _block(act, "conv3x3")
        fused, report = normfx.rewrite_with_report(model, "fuse:border_correction=true", example_inputs=x)
        _assert_exact(model, fused, x)
        assert report.entries[0].details["post"].startswith(post)
        assert report.entries[0].details["leftover_ops"] == left


def test_relu_with_a_dead_proxy_channel_takes_per_channel_bounds():
    model = _block("relu", "conv3x3")
    with torch.no_grad():
        model[2].bias[0] = -10.0  # every proxy sample below 0: mean 0, the 1/mean rescale does not exist
    x = torch.randn(2, 3, 8, 8)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    _assert_exact(model, fused, x)
    entry = report.entries[0]
    assert "torch.maximum" in entry.details["activation"] and entry.details["leftover_ops"] == 0
    assert dict(_ops(_onnx(fused, x)) - _ops(_onnx(_gn_act_twin(model), x))) == {"Max": 1}


def test_unfused_export_computes_proxy_statistics_the_check_sees_it():
    model = _block("silu", "conv1x1")
    constant = constant_nodes(_onnx(model, torch.randn(2, 3, 8, 8)))
    assert {"ReduceMean", "Sqrt"} <= set(constant)


def test_group_norm_affine_is_composed_and_layer_norm_over_channels_folds():
    model = randomize_proxy_norm(nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.GroupNorm(2, C), ProxyNormAct(C, nn.SiLU()),
                                     nn.Conv2d(C, 4, 1)))
    x = torch.randn(2, 3, 8, 8)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    _assert_exact(model, fused, x)
    assert "composed with its affine" in report.entries[0].details["pre"]
    layer_norm = _block("gelu", "conv1x1", norm="layernorm")
    for inputs in (x, None):  # the rank comes from example_inputs, or from the conv feeding the LayerNorm
        fused, report = normfx.rewrite_with_report(layer_norm, "fuse", example_inputs=inputs)
        _assert_exact(layer_norm, fused, x)
        assert "LayerNorm '1' (as its new affine)" in report.entries[0].details["pre"]
        assert report.entries[0].details["leftover_ops"] == 0


def test_pre_affine_folds_into_a_conv_when_no_norm_precedes():
    model = randomize_proxy_norm(nn.Sequential(nn.Conv2d(3, C, 3, padding=1), ProxyNormAct(C, nn.GELU()), nn.Conv2d(C, 4, 1)))
    x = torch.randn(2, 3, 8, 8)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    _assert_exact(model, fused, x)
    entry = report.entries[0]
    assert entry.details["pre"] == "Conv2d '0'" and entry.details["leftover_ops"] == 0
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 2


class _Residual(nn.Module):
    """conv → GN → PN → conv1x1 → GN → PN → (+ input): the second PN feeds a residual addition."""

    def __init__(self, act) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, C, 1)
        self.conv1 = nn.Conv2d(C, C, 3, padding=1)
        self.gn1 = nn.GroupNorm(4, C, affine=False)
        self.pn1 = ProxyNormAct(C, act())
        self.conv2 = nn.Conv2d(C, C, 1)
        self.gn2 = nn.GroupNorm(4, C, affine=False)
        self.pn2 = ProxyNormAct(C, act())

    def forward(self, x):
        x = self.conv0(x)
        return self.pn2(self.gn2(self.conv2(self.pn1(self.gn1(self.conv1(x)))))) + x


@pytest.mark.parametrize("act,left", [("relu", 0), ("silu", 2), ("leaky_relu", 1)])
def test_residual_block(act, left):
    model = randomize_proxy_norm(_Residual(ACTIVATIONS[act]))
    x = torch.randn(2, 3, 8, 8)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    _assert_exact(model, fused, x)
    assert _left(fused) == 0
    first, second = report.entries
    assert first.details["post"] == "Conv2d 'conv2'" and first.details["leftover_ops"] == 0
    assert second.details["leftover_ops"] == left
    assert "the ProxyNormAct output goes to an addition" in second.reason  # forward_fold's reason, its noun
    assert "BN" not in second.reason
    assert constant_nodes(_onnx(fused, x)) == []


def test_linear_before_proxy_norm_reasons_name_the_proxy_norm():
    """backward_fold's Linear-rank reasons for the pre-affine speak of the ProxyNormAct, not of a BN."""
    model = randomize_proxy_norm(nn.Sequential(nn.Linear(8, 5), ProxyNormAct(5, nn.SiLU()), nn.Conv1d(5, 3, 1))).eval()
    x = torch.randn(4, 5, 8)  # the ProxyNormAct's channel axis 1 holds the Linear's 5 positions, not its features
    for example, words in ((x, "'0' gets a 3-D input: ProxyNormAct's channel axis 1 is not the Linear's features"),
                           (None, "'0' is a Linear: a ProxyNormAct folds into it only when its input is 2-D")):
        fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=example)
        [entry] = report.entries
        assert entry.status == "applied" and words in entry.details["pre"] and "BN" not in entry.reason
        _assert_exact(model, fused, x)


class _TwoBranches(nn.Module):
    def __init__(self, second: nn.Module) -> None:
        super().__init__()
        self.gn = nn.GroupNorm(4, C)
        self.pn = ProxyNormAct(C, nn.SiLU())
        self.a = nn.Conv2d(C, 4, 1)
        self.b = second

    def forward(self, x):
        y = self.pn(self.gn(x))
        return self.a(y) + self.b(y)


def test_several_users_fold_on_every_path_or_keep_one_affine():
    x = torch.randn(2, C, 6, 6)
    model = randomize_proxy_norm(_TwoBranches(nn.Conv2d(C, 4, 1)))  # inception-like: both paths take the whole affine
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    _assert_exact(model, fused, x)
    assert report.entries[0].details["into"] == ["Conv2d 'a'", "Conv2d 'b'"]
    assert report.entries[0].details["leftover_ops"] == 0
    model = randomize_proxy_norm(_TwoBranches(nn.Conv2d(C, 4, 3, padding=1)))  # a padded path: the scale only, offset kept
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    _assert_exact(model, fused, x)
    entry = report.entries[0]
    assert entry.details["leftover_ops"] == 1 and "its output has 2 users" in entry.reason
    assert "scale into Conv2d 'a', Conv2d 'b'" in entry.details["post"]


class _SqueezeExcite(nn.Module):
    """GN → PN(SiLU) → squeeze-excitation gate → projection 1x1, as in EfficientNet's MBConv."""

    def __init__(self, twice: bool = False) -> None:
        super().__init__()
        self.gn = nn.GroupNorm(4, C, affine=False)
        self.pn = ProxyNormAct(C, nn.SiLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(C, 2, 1)
        self.fc2 = nn.Conv2d(2, C, 1)
        self.project = nn.Conv2d(C, 4, 1)
        self.twice = twice

    def forward(self, x):
        y = self.pn(self.gn(x))
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(y)))))
        if self.twice:  # y * pool(y): both factors carry the scale, which must not be folded twice
            return self.project(y * self.pool(y))
        return self.project(y * gate)


def test_squeeze_excitation_takes_the_scale_on_both_paths():
    x = torch.randn(2, C, 6, 6)
    model = randomize_proxy_norm(_SqueezeExcite())
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    _assert_exact(model, fused, x)
    entry = report.entries[0]
    assert entry.details["leftover_ops"] == 1
    assert "scale into Conv2d 'fc1', Conv2d 'project'" in entry.details["post"]
    model = randomize_proxy_norm(_SqueezeExcite(twice=True))
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    _assert_exact(model, fused, x)
    entry = report.entries[0]
    assert entry.details["leftover_ops"] == 2 and "both carry the scale" in entry.reason


def test_linear_after_a_2d_group_norm():
    model = randomize_proxy_norm(nn.Sequential(nn.Linear(5, C), nn.GroupNorm(2, C, affine=False), ProxyNormAct(C, nn.SiLU()),
                                     nn.Linear(C, 3)))
    x = torch.randn(4, 5)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    _assert_exact(model, fused, x)
    assert report.entries[0].details["post"] == "Linear '3'" and report.entries[0].details["leftover_ops"] == 0


@pytest.mark.parametrize("cls,shape", [(StdConv1d, (2, 3, 11)), (StdConv2d, (2, 3, 9, 9)), (StdConv3d, (2, 3, 5, 6, 6))])
def test_std_conv_becomes_a_plain_conv(cls, shape):
    torch.manual_seed(0)
    model = nn.Sequential(cls(3, 6, 3, padding=1, bias=True), nn.ReLU()).eval()
    x = torch.randn(*shape)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    with torch.no_grad():
        assert rel_error(model.double()(x.double()), fused(x)) <= 1e-6
    model.float()
    assert _left(fused) == 0 and type(fused.get_submodule("0")) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    assert set(fused.state_dict()) == set(model.state_dict())
    assert report.entries[0].status == "applied" and report.entries[0].name == "0"
    single = normfx.rewrite(model[0], "fuse")
    assert type(single) is type(fused.get_submodule("0"))


def test_std_conv_then_batch_norm_and_group_norm_fold_completely():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    bn = randomize_proxy_norm(nn.Sequential(StdConv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C), nn.ReLU()))
    fused = normfx.rewrite(bn, "fuse")
    _assert_exact(bn, fused, x)
    assert _left(fused) == 0 and not any(is_batchnorm(m) for m in fused.modules())
    gn = randomize_proxy_norm(nn.Sequential(StdConv2d(3, C, 3, padding=1), nn.GroupNorm(4, C, affine=False),
                                  ProxyNormAct(C, nn.SiLU()), StdConv2d(C, 4, 1)))
    fused, report = normfx.rewrite_with_report(gn, "fuse", example_inputs=x)
    _assert_exact(gn, fused, x)
    assert _left(fused) == 0 and [e.status for e in report.entries] == ["applied"] * 3
    assert report.entries[-1].details["post"] == "Conv2d '3'"


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = StdConv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else self.conv(-x)


def test_std_conv_in_an_untraceable_part_is_swapped_as_a_module():
    model = _Untraceable().eval()
    x = torch.rand(2, 3, 7, 7)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    assert _left(fused) == 0 and rel_error(model(x), fused(x)) <= 1e-6
    assert "swapped as a module" in report.entries[0].reason


def test_explain_reports_what_rewrite_does_and_state_dict_loses_only_folded_parameters():
    model = randomize_proxy_norm(_Residual(nn.ReLU))
    x = torch.randn(2, 3, 8, 8)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    explained = normfx.explain(model, "fuse", example_inputs=x)
    assert [(e.name, e.status, e.reason) for e in explained.entries] == [(e.name, e.status, e.reason) for e in report.entries]
    keys = set(fused.state_dict())
    assert not any(k.startswith(("pn1.", "pn2.")) and not k.startswith(("pn1.activation", "pn2.activation")) for k in keys)
    assert {"gn1.weight", "gn1.bias", "conv2.weight", "conv2.bias"} <= keys


# ------------------------------------------------------------------------------------------------ negative


def test_training_mode_layers_are_skipped_with_the_reason():
    model = _block("silu", "conv1x1").train()
    fused, report = normfx.rewrite_with_report(model, "fuse")
    assert report.skipped[0].name == "2" and "training mode" in report.skipped[0].reason
    assert _left(fused) == 1
    std = nn.Sequential(StdConv2d(3, 4, 3), nn.ReLU()).train()
    report = normfx.explain(std, "fuse")
    assert report.skipped[0].name == "0" and "training mode" in report.skipped[0].reason


class _NormUsedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gn = nn.GroupNorm(4, C, affine=False)
        self.pn = ProxyNormAct(C, nn.SiLU())
        self.conv = nn.Conv2d(C, 4, 1)

    def forward(self, x):
        y = self.gn(x)
        return self.conv(self.pn(y)), y


def test_norm_with_other_users_keeps_the_pre_affine():
    model = randomize_proxy_norm(_NormUsedTwice())
    x = torch.randn(2, C, 5, 5)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double())
        for ref, out in zip(reference, fused(x)):
            assert rel_error(ref, out) <= 1e-5
    entry = report.entries[0]
    assert entry.details["pre"].startswith("kept: Mul + Add") and "also used by" in entry.details["pre"]
    assert entry.details["leftover_ops"] == 2 and _left(fused) == 0


def test_unknown_rank_skips_only_what_needs_it():
    model = randomize_proxy_norm(nn.Sequential(nn.GroupNorm(4, C, affine=False), ProxyNormAct(C, nn.ReLU())))
    x = torch.randn(2, C, 5, 5)
    kept, report = normfx.rewrite_with_report(model, "fuse")  # no conv, no example_inputs: rank unknown
    assert report.skipped[0].name == "1" and "input rank is unknown" in report.skipped[0].reason
    assert _left(kept) == 1 and rel_error(model(x), kept(x)) <= 1e-6
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    assert _left(fused) == 0 and not report.skipped
    _assert_exact(model, fused, x)


def test_forward_false_keeps_the_post_affine_and_strict_passes():
    model = _block("silu", "conv1x1")
    x = torch.randn(2, 3, 8, 8)
    fused, report = normfx.rewrite_with_report(model, "fuse:forward=false", example_inputs=x, strict=True)
    _assert_exact(model, fused, x)
    assert report.entries[0].details["leftover_ops"] == 2 and "forward=false" in report.entries[0].reason


# --------------------------------------------------------------------------------------------------- the zoo


NO_BN_ACT_PAIR = {"bn_conv"}  # every BN there sits right before a conv: proxynorm makes GroupNorms with affine
NO_BN_ACT_PAIR |= {"repvgg", "mobileone"}  # every BN feeds the branch sum (the ReLU comes after the addition)


# deep_silu is ill-conditioned by construction (a large offset shared by all channels, cancelled by a zero-sum
# classifier): after proxynorm, folding the last ProxyNormAct's post-affine into that classifier loses precision —
# 1.75e-5 against the converted model's own fp32 floor of 1.2e-6. A known gap of the fold, tracked here: when the
# fold learns to decline (or compensate) such a cancellation, this strict xfail fails and must be removed.
_PN_FOLD_LOSES_PRECISION = {"deep_silu"}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason="PN post-affine fold into a cancelling classifier "
                                                                "loses precision (see _PN_FOLD_LOSES_PRECISION)"))
    if n in _PN_FOLD_LOSES_PRECISION else n
    for n in models.names() if "foreign_bn" not in models.info(n).tags])
def test_zoo_proxynorm_then_fuse_leaves_no_proxy_norm(name):
    model = models.create(name)
    x = models.example_input(name, batch=2)
    converted = normfx.rewrite(model, "proxynorm", example_inputs=x)
    has_pn = any(isinstance(m, ProxyNormAct) for m in converted.modules())
    assert has_pn == (name not in NO_BN_ACT_PAIR)
    if not has_pn:  # nothing to fold but the GroupNorms: fuse keeps the function
        _assert_exact(converted, normfx.rewrite(converted, "fuse", example_inputs=x), x)
        return
    converted = randomize_proxy_norm(converted, seed=3)
    fused, report = normfx.rewrite_with_report(converted, "fuse", example_inputs=x)
    _assert_exact(converted, fused, x)
    assert sum(isinstance(m, ProxyNormAct) for m in fused.modules()) == 0
    proxy = {n for n, m in converted.named_modules() if isinstance(m, ProxyNormAct)}
    entries = [e for e in report.entries if e.name in proxy]
    assert {e.name for e in entries} == proxy and all(e.status == "applied" for e in entries)
    if name in ("resnet18", "efficientnet_b0"):
        assert constant_nodes(_onnx(fused, x)) == []


class _Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gn = nn.GroupNorm(2, 4)
        self.pn = ProxyNormAct(4, nn.SiLU())
        self.conv = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.conv(self.pn(self.gn(x))) if x.sum() > 0 else x[:, :2]


class _UntracedProxyNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.unused = ProxyNormAct(4)
        self.gate = _Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


def test_untraced_and_unused_proxy_norm_are_reported():
    model = randomize_proxy_norm(_UntracedProxyNorm())
    fused, report = normfx.rewrite_with_report(model, "fuse")
    reasons = {e.name: e.reason for e in report.skipped}
    assert "'gate' cannot be traced" in reasons["gate.pn"] and "never called" in reasons["unused"]
    x = torch.rand(2, 3, 5, 5)
    assert rel_error(model(x), fused(x)) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_nearly_dead_channel_stays_finite(dtype):
    """A nearly dead ReLU channel (proxy mean ~1e-5): the 1/mean rescale (clamp(min=-1)) would put ~1e5 into the
    GroupNorm weight, inf in float16; fuse must take the next exact option and stay finite and accurate."""
    torch.manual_seed(0)
    c = 4
    net = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.GroupNorm(2, c, affine=False), ProxyNormAct(c, nn.ReLU()),
                        nn.Conv2d(c, 4, 3, padding=1))
    with torch.no_grad():
        net[2].weight.fill_(1.0)
        net[2].bias.copy_(torch.tensor([0.0, 0.5, -2.80, -2.805]))
    net.eval()
    assert float(net[2].proxy_moments()[0].detach().min()) < 1e-4
    x = torch.randn(2, 3, 8, 8)
    model = copy.deepcopy(net).to(dtype)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=(x.to(dtype),))
    assert report.entries[0].status == "applied", report.entries[0].reason
    assert all(torch.isfinite(t).all() for t in list(fused.parameters()) + list(fused.buffers()))
    with torch.no_grad():
        reference = copy.deepcopy(net).double()(x.double())
        unfused, out = model(x.to(dtype)).double(), fused(x.to(dtype)).double()
    assert torch.isfinite(out).all()
    floor = rel_error(reference, unfused)
    assert rel_error(reference, out) <= max(4 * floor, 1e-2 if dtype == torch.bfloat16 else 2e-3)
