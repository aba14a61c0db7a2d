"""Policy ``fuse`` on torch models (torch.fx route): every zoo model, the traps, and each skip reason."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_state_equal, fp32_tolerance, rel_error, snapshot, storages
from torch import nn

import normfx
from normfx import models
from normfx.errors import RewriteError
from normfx.inspect import batchnorm_calls
from normfx.layers import is_batchnorm

FULLY_FOLDED = [
    "resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "unet", "conv1d", "conv3d", "mlp",
    "trap_bn_act", "trap_functional_bn", "trap_shared_conv", "trap_shared_bn", "trap_syncbn",
]


def _randomized(model: nn.Module, seed: int = 5) -> nn.Module:
    models.randomize_batchnorm(model, seed)
    return model.eval()


@pytest.mark.parametrize("name", models.names())
def test_fuse_is_exact_and_leaves_only_reasoned_bn(name):
    model = models.create(name, seed=2)
    x = models.example_input(name, batch=2, seed=2)
    before = snapshot(model)
    with torch.no_grad():
        y = model(x)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    assert_state_equal(before, model)
    assert not storages(fused) & storages(model)
    with torch.no_grad():
        assert rel_error(y, fused(x)) <= fp32_tolerance(model, x)  # 1e-5 but on fp32_noise models
    assert batchnorm_calls(fused) == len(report.skipped)
    assert all(e.reason for e in report.skipped)
    explained = normfx.explain(model, "fuse", example_inputs=x)
    assert [(e.name, e.status, e.reason) for e in explained.entries] == [(e.name, e.status, e.reason) for e in report.entries]
    if name in FULLY_FOLDED:
        assert batchnorm_calls(fused) == 0 and not report.skipped


def test_preact_and_densenet_skips_name_the_preactivation_pattern():
    for name in ("preact_resnet", "densenet"):  # preact_resnet folds completely (tests/test_preact_fx.py)
        report = normfx.explain(models.create(name), "fuse", example_inputs=models.example_input(name))
        assert bool(report.skipped) == (name == "densenet")
        assert all("pre-activation" in e.reason or "not a Conv" in e.reason for e in report.skipped)


def test_shared_conv_is_duplicated_or_skipped_never_corrupted():
    model = models.create("trap_shared_conv")
    x = models.example_input("trap_shared_conv", batch=2)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    notes = [e.details.get("note", "") for e in report.applied]
    assert any("private copy" in n for n in notes)
    assert rel_error(model(x), fused(x)) <= 1e-5
    kept, report = normfx.rewrite_with_report(model, "fuse:duplicate_shared=false")
    reasons = [e.reason for e in report.skipped]
    assert any("called 2 times" in r for r in reasons)
    assert rel_error(model(x), kept(x)) <= 1e-5


def test_bn_used_twice_folds_at_both_calls():
    model = models.create("trap_shared_bn")
    x = models.example_input("trap_shared_bn", batch=2)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    shared = [name for name, m in model.named_modules() if is_batchnorm(m)]
    calls = [e for e in report.applied if e.name in shared]
    assert len(calls) > len({e.name for e in calls}), "the shared BN is folded at each of its calls"
    assert batchnorm_calls(fused) == 0
    assert rel_error(model(x), fused(x)) <= 1e-5


def test_untraceable_submodule_costs_only_its_own_folds():
    model = models.create("trap_untraceable")
    x = models.example_input("trap_untraceable", batch=2)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    untraced = {e.name for e in report.skipped}
    assert untraced == {"gate.bn"} and "'gate' cannot be traced by torch.fx" in report.skipped[0].reason
    assert {e.name for e in report.applied} == {"stem.1", "tail.1"}, "the traceable parts are still folded"
    assert rel_error(model(x), fused(x)) <= 1e-5


class _TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _Functional(nn.Module):
    def __init__(self, training: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("rm", torch.randn(4))
        self.register_buffer("rv", torch.rand(4) + 0.5)
        self.training_flag = training

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.rm, self.rv, None, None, self.training_flag, 0.1, 1e-5)


def test_skip_reasons_for_declined_sites():
    report = normfx.explain(_randomized(_TwoUsers()), "fuse")
    assert report.skipped[0].name == "bn" and "also used by" in report.skipped[0].reason

    training = _randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    report = normfx.explain(training, "fuse")
    assert "training mode" in report.skipped[0].reason

    report = normfx.explain(_Functional(training=True).eval(), "fuse")
    assert "training=True" in report.skipped[0].reason

    pooled = _randomized(nn.Sequential(nn.MaxPool2d(2), nn.BatchNorm2d(3), nn.Flatten()))
    report = normfx.explain(pooled, "fuse")
    assert "MaxPool2d" in report.skipped[0].reason and "Flatten" in report.skipped[0].reason

    with pytest.raises(RewriteError, match="strict=True"):
        normfx.rewrite(pooled, "fuse", strict=True)


def test_functional_bn_with_constant_statistics_folds_exactly():
    torch.manual_seed(0)
    model = _Functional(training=False).eval()
    x = torch.randn(2, 3, 8, 8)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    assert len(report.applied) == 1 and batchnorm_calls(fused) == 0
    assert rel_error(model(x), fused(x)) <= 1e-5
    assert not any(k in dict(fused.named_buffers()) for k in ("rm", "rv"))


def test_forward_fold_padded_conv_needs_shapes_and_then_is_exact():
    model = _randomized(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 5, 3, padding=1), nn.ReLU()))
    x = torch.randn(2, 3, 9, 7)
    report = normfx.explain(model, "fuse:border_correction=true")
    assert "pass example_inputs" in report.skipped[0].reason
    report = normfx.explain(model, "fuse", example_inputs=x)
    assert "set border_correction=true" in report.skipped[0].reason
    fused, report = normfx.rewrite_with_report(model, "fuse:border_correction=true", example_inputs=x)
    assert "exact for input shape [2, 3, 9, 7]" in report.applied[0].details["border_correction"]
    assert rel_error(model(x), fused(x)) <= 1e-5
    off = normfx.explain(model, "fuse:forward=false", example_inputs=x)
    assert "forward fold disabled" in off.skipped[0].reason


def test_bn_conv_folds_completely_with_border_correction():
    model = models.create("bn_conv")
    x = models.example_input("bn_conv", batch=2)
    fused, report = normfx.rewrite_with_report(model, "fuse", border_correction=True, example_inputs=x)
    assert batchnorm_calls(fused) == 0 and not report.skipped
    assert any("border_correction" in e.details for e in report.applied)
    assert rel_error(model(x), fused(x)) <= 1e-5


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 6, 1),
    nn.Conv2d(3, 6, 3, stride=2, dilation=2),
    nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(6, 6, 3, groups=6, bias=False),
    nn.Conv2d(6, 4, 3, groups=2),
])
def test_forward_fold_exact_without_shapes(conv):
    cin = conv.in_channels
    model = _randomized(nn.Sequential(nn.BatchNorm2d(cin), conv))
    x = torch.randn(2, cin, 11, 11)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    assert len(report.applied) == 1 and report.applied[0].details["direction"] == "forward"
    assert rel_error(model(x), fused(x)) <= 1e-5


def test_linear_with_3d_input_is_not_folded_into_bn1d():
    model = _randomized(nn.Sequential(nn.Linear(8, 5), nn.BatchNorm1d(5)))
    x = torch.randn(4, 5, 8)  # BN1d normalizes axis 1 (5 positions), not the Linear's features
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    assert report.skipped and "3-D input" in report.skipped[0].reason
    assert rel_error(model(x), fused(x)) <= 1e-5


def test_float64_model_and_conv_without_bias():
    model = _randomized(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    fused = normfx.rewrite(model, "fuse")
    assert fused.get_submodule("0").weight.dtype == torch.float64
    assert rel_error(model(x), fused(x)) <= 1e-12


def test_override_folds_only_matching_layers():
    model = models.create("resnet18")
    x = models.example_input("resnet18")
    fused, report = normfx.rewrite_with_report(model, {"layer1.*": "fuse", "*": "keep"})
    folded = {e.name for e in report.applied}
    assert folded and all(name.startswith("layer1.") for name in folded)
    assert rel_error(model(x), fused(x)) <= 1e-5


def test_result_shares_no_container_or_hook_registry_with_the_input():
    model = _randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    fused = normfx.rewrite(model, "fuse")
    fired = []
    fused.get_submodule("0").register_forward_hook(lambda *args: fired.append(1))
    model(torch.randn(1, 3, 6, 6))
    assert not fired
    containers = lambda m: {id(v) for mod in m.modules() for v in vars(mod).values() if isinstance(v, (dict, set, list))}  # noqa: E731
    assert not containers(model) & containers(fused)


def test_linear_bn_needs_example_inputs_to_prove_a_2d_input():
    model = _randomized(nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)))
    x3 = torch.randn(3, 5, 5)  # BN1d would normalize axis 1 (positions), not the features
    fused, report = normfx.rewrite_with_report(model, "fuse")
    assert report.skipped and "pass example_inputs to prove it" in report.skipped[0].reason
    assert rel_error(model(x3), fused(x3)) <= 1e-5
    x2 = torch.randn(4, 5)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x2)
    assert len(report.applied) == 1 and rel_error(model(x2), fused(x2)) <= 1e-5


class _Gate(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: torch.fx cannot trace this module
            return self.conv(x)
        return -self.conv(x)


class _ConvAlsoUsedByUntracedPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.gate = _Gate(self.conv)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.gate(x)


@pytest.mark.parametrize("policy", ["fuse", ["keep", "fuse"]])
def test_conv_also_called_by_an_untraced_part_is_copied_not_corrupted(policy):
    model = _randomized(_ConvAlsoUsedByUntracedPart())
    x = torch.randn(2, 3, 8, 8)
    fused, report = normfx.rewrite_with_report(model, policy)
    assert rel_error(model(x), fused(x)) <= 1e-5
    (entry,) = [e for e in report.entries if e.rule == "fuse"]
    assert entry.status == "applied" and "private copy" in entry.details["note"]
    kept, report = normfx.rewrite_with_report(model, "fuse:duplicate_shared=false")
    assert "registered elsewhere" in report.skipped[0].reason
    assert rel_error(model(x), kept(x)) <= 1e-5


def test_single_bn_model_is_reported():
    report = normfx.explain(_randomized(nn.BatchNorm2d(3)), "fuse")
    assert report.skipped[0].reason == "the model is a single BatchNorm: there is no layer to fold it into"


def test_overrides_reach_functional_batch_norm_calls():
    model = models.create("trap_functional_bn")
    report = normfx.explain(model, {"block1.*": "keep", "*": "fuse"})
    names = {e.name for e in report.applied}
    assert "block2.batch_norm_1" in names and not any(n.startswith("block1.") for n in names)


@pytest.mark.parametrize("form", ["module", "function", "method", "keyword"])
def test_an_inplace_activation_whose_result_is_unused_is_kept(form):
    """``self.relu(y)`` with the result thrown away still changes ``y``: dead-code elimination must keep it."""

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.relu, self.head = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.bn(self.conv(x))
            if form == "module":
                self.relu(y)
            elif form == "function":
                F.relu_(y)
            elif form == "method":
                y.relu_()
            else:
                F.relu(y, inplace=True)
            return self.head(y)

    model = _randomized(InPlace())
    x = torch.randn(2, 3, 8, 8)
    fused = normfx.rewrite(model, "fuse")
    with torch.no_grad():
        assert rel_error(model(x.clone()), fused(x.clone())) <= 1e-5
    assert batchnorm_calls(fused) == 0
