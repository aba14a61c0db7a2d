"""``normfx.lint``: every planted devil reported on its layer with its severity (torch and ONNX), no false
alarm on the clean zoo models, the negative cases of each check, and the caller's model left untouched."""

from __future__ import annotations

import copy
import io

import numpy as np
import onnx
import pytest
import torch
from helpers import snapshot
from onnx_graphs import Builder
from torch import nn

import normfx
from normfx import models
from normfx.layers import FrozenBatchNorm2d
from normfx.lint import LintReport
from normfx.lint.conventions_check import looks_uniform01
from normfx.models.devils import DEVILS, devil_net, fresh_legacy_net


def _has(report: LintReport, layer: str, check: str, severity: str) -> bool:
    return any(f.check == check and f.severity == severity for f in report.on(layer))


def _serious(report: LintReport) -> list[tuple[str, str, str]]:
    return sorted((f.check, f.layer, f.severity) for f in report.findings if f.severity != "info")


# --- the planted devils --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def devils():
    model, x = devil_net()
    before = snapshot(model)
    modes = {n: m.training for n, m in model.named_modules()}
    report = normfx.lint(model, x)
    return model, x, report, before, modes


@pytest.mark.parametrize("layer, check, severity", DEVILS)
def test_every_planted_devil_is_reported_on_its_layer(devils, layer, check, severity):
    _, _, report, _, _ = devils
    assert _has(report, layer, check, severity), f"{check} ({severity}) not reported on {layer}:\n{report}"


def test_devils_report_nothing_else_at_warning_or_error(devils):
    """No false alarm on the devil model's innocent layers (stem, the clean convs, bias_bn, fc)."""
    _, _, report, _, _ = devils
    expected = sorted((check, layer, severity) for layer, check, severity in DEVILS if severity != "info")
    assert _serious(report) == expected
    assert not report.ok and len(report.errors) == 3


def test_each_finding_has_an_explanation_and_fixes_where_normfx_has_one(devils):
    _, _, report, _, _ = devils
    for finding in report.findings:
        assert finding.message and "\n" not in finding.message
    fix = {(f.layer, f.check): f.fix for f in report.findings}
    assert fix[("nan_bn", "statistics")] == "normfx.rewrite(model, 'precise', data=batches)"
    assert fix[("eps_bn", "eps")] == "normfx.conventions.raise_eps(model, 1e-05)"
    assert fix[("overflow_bn", "fold_fp16_overflow")] == "normfx.rewrite(model, {'overflow_bn': 'keep', '*': 'fuse'})"
    assert fix[("train_bn", "batch_of_one")] == "normfx.rewrite(model, 'frozen')"
    assert fix[("bias_conv", "bias_before_bn")] is None  # no normfx command: the message says bias=False


def test_numbers_in_the_findings(devils):
    _, _, report, _, _ = devils
    overflow = report.on("overflow_bn", "fold_fp16_overflow")[0]
    assert overflow.details["into"] == "overflow_conv" and overflow.details["max_abs"] > 65504
    precision = report.on("precision_bn", "fold_precision")[0]
    assert precision.details["channel"] == 3
    assert precision.details["max_scale"] == pytest.approx(5 / np.sqrt(1e-6 + 1e-5), rel=1e-6)
    assert report.on("twice_bn", "reached_twice")[0].details["calls"] == 2
    assert report.on("negvar_bn", "running_var")[0].details["channels"] == [2]
    assert report.on("nan_bn", "statistics")[0].details["channels"] == [1]
    assert report.on("block", "mixed_frozen")[0].details == {"frozen": ["block.bn1"], "trainable": ["block.bn2"]}
    # the fold reason is explain's own (explain cannot run on the model itself: torch fuse stops at NaN statistics)
    repaired = copy.deepcopy(devils[0])
    with torch.no_grad():
        repaired.nan_bn.running_mean.nan_to_num_(0.0)
        repaired.negvar_bn.running_var.abs_()
    reason = normfx.explain(repaired, "fuse")
    standalone = next(e for e in reason.entries if e.name == "standalone_bn")
    assert report.on("standalone_bn", "fold")[0].details["reason"] == standalone.reason


def test_the_model_is_not_modified(devils):
    model, _, _, before, modes = devils
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():  # NaN statistics are planted: NaN equals NaN here
        assert torch.allclose(after[key], value, rtol=0, atol=0, equal_nan=True), f"{key} changed"
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_json_round_trip(devils):
    import json

    _, _, report, _, _ = devils
    data = json.loads(json.dumps(report.to_dict()))
    assert data["summary"] == {"info": len(report.infos), "warning": len(report.warnings), "error": 3}
    assert {"eps", "reached", "mixed_frozen", "fold"} <= set(data["checks_run"])


def test_fresh_model_with_uniform_gamma():
    model, x = fresh_legacy_net()
    report = normfx.lint(model, x)
    assert _has(report, "bn2", "fresh_gamma", "warning")
    assert not report.on("bn1", "fresh_gamma")  # γ = 1: PyTorch's own init
    assert _serious(report) == [("fresh_gamma", "bn2", "warning")]


def test_uniform_gamma_in_a_trained_model_is_not_flagged():
    model, x = fresh_legacy_net()
    with torch.no_grad():
        model.bn1.running_mean.add_(0.1)  # statistics moved: the model does not claim to be fresh
    assert not normfx.lint(model, x).on("bn2", "fresh_gamma")
    model, x = fresh_legacy_net()
    model.bn1.num_batches_tracked.fill_(10)
    assert not normfx.lint(model, x).on("bn2", "fresh_gamma")


@pytest.mark.parametrize("gamma, expected", [
    (np.random.default_rng(0).uniform(0, 1, 64), True),
    (np.random.default_rng(1).uniform(0, 1, 16), True),
    (np.ones(64), False),                                    # PyTorch's init
    (np.random.default_rng(0).uniform(0.5, 1.5, 64), False),  # reaches past 1
    (np.random.default_rng(0).uniform(0, 0.3, 64), False),    # inside [0, 1) but far from uniform on it
    (np.random.default_rng(0).uniform(0, 1, 4), False),       # too few channels to tell
])
def test_looks_uniform01(gamma, expected):
    assert looks_uniform01(gamma)[0] is expected


# --- the clean zoo -------------------------------------------------------------------------------------------

#: findings at warning severity that zoo models genuinely have (see docs/lint.md): biased layers before BN built on
#: purpose to test folds with a bias, and the trap whose point is a BN called twice
ZOO_DEVILS = {
    "unet": [("bias_before_bn", "up1.0", "warning")],
    "conv1d": [("bias_before_bn", "block.0", "warning")],
    "conv3d": [("bias_before_bn", "down.3", "warning")],
    "mlp": [("bias_before_bn", "fc1", "warning")],
    "trap_bn_act": [("bias_before_bn", "conv3", "warning")],
    "trap_shared_bn": [("bias_before_bn", "conv_b", "warning"), ("reached_twice", "bn", "warning")],
}


@pytest.mark.parametrize("name", models.names())
def test_zoo_models(name):
    """Every zoo model of the catalog (read at test time): no finding at warning or error severity except the
    devils it was built with, listed exactly."""
    model = models.create(name)
    report = normfx.lint(model, models.example_input(name, batch=2))
    assert report.ok
    assert _serious(report) == sorted(ZOO_DEVILS.get(name, [])), str(report)
    assert "reached" in report.checks_run and not any(f.details.get("not_run") for f in report.findings)


def test_zoo_devils_are_real():
    """What the zoo's findings claim: the flagged bias gets zero gradient through its train-mode BN."""
    model = models.create("mlp").train()
    x = models.example_input("mlp", batch=8)
    model(x).square().sum().backward()
    assert model.fc1.bias.grad.abs().max() < 1e-6 * model.fc1.weight.grad.abs().max()


def test_without_inputs_the_reach_checks_are_reported_not_run():
    report = normfx.lint(models.create("resnet18"))
    not_run = [f for f in report.findings if f.details.get("not_run")]
    assert len(not_run) == 1 and not_run[0].severity == "info" and not_run[0].check == "reached"
    assert not report.warnings and not report.errors


# --- negative cases of the single checks ---------------------------------------------------------------------


def _conv_bn(**bn_kwargs) -> nn.Sequential:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, **bn_kwargs), nn.ReLU())
    models.randomize_batchnorm(model, 0)
    return model.eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("eps, severity", [(1e-5, None), (1e-3, None), (9e-6, "warning"), (0.0, "error")])
def test_eps_threshold(eps, severity):
    report = normfx.lint(_conv_bn(eps=eps), X)
    found = report.on("1", "eps")
    assert [f.severity for f in found] == ([severity] if severity else [])


@pytest.mark.parametrize("momentum, flagged", [(0.1, False), (0.01, False), (None, False), (0.9, True), (0.99, True),
                                               (0.997, True), (0.999, True), (0.5, False)])
def test_momentum(momentum, flagged):
    report = normfx.lint(_conv_bn(momentum=momentum), X)
    assert bool(report.on("1", "momentum")) is flagged


def test_zero_variance_is_a_warning_and_inf_weight_an_error():
    model = _conv_bn()
    with torch.no_grad():
        model[1].running_var[0] = 0.0
        model[1].weight[5] = float("inf")
    report = normfx.lint(model, X)
    assert _has(report, "1", "running_var", "warning") and _has(report, "1", "weights", "error")
    assert report.on("1", "weights")[0].fix is None and report.on("1", "weights")[0].details["channels"] == [5]


def test_bias_before_bn_negatives():
    """Not flagged: a biased conv whose output has another use, a conv called twice, a Frozen BN after it."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used_twice_out = nn.Conv2d(3, 8, 1, bias=True)
            self.bn_a = nn.BatchNorm2d(8)
            self.shared = nn.Conv2d(8, 8, 1, bias=True)
            self.bn_b = nn.BatchNorm2d(8)
            self.to_frozen = nn.Conv2d(8, 8, 1, bias=True)
            self.frozen = FrozenBatchNorm2d(8)

        def forward(self, x):
            y = self.used_twice_out(x)
            z = self.bn_a(y) + y
            z = self.bn_b(self.shared(z)) + self.shared(z)
            return self.frozen(self.to_frozen(z))

    model = Net()
    models.randomize_batchnorm(model, 0)
    report = normfx.lint(model.eval(), X)
    assert not [f for f in report.findings if f.check == "bias_before_bn"]


def test_residual_block_all_frozen_or_all_trainable_is_clean():
    model, x = devil_net()
    block = model.block
    mixed = nn.Sequential(block).eval()
    assert [f.layer for f in normfx.lint(mixed, torch.randn(2, 8, 8, 8)).findings if f.check == "mixed_frozen"] == ["0"]
    for candidate in (normfx.rewrite(mixed, "frozen"), normfx.rewrite(mixed, "unfrozen")):
        assert not [f for f in normfx.lint(candidate, torch.randn(2, 8, 8, 8)).findings if f.check == "mixed_frozen"]


def test_train_mode_bn_with_a_real_batch_is_not_flagged():
    model = _conv_bn().train()
    report = normfx.lint(model, X)  # batch of 2
    assert not report.on("1", "batch_of_one") and not report.on("1", "mode")  # the whole model trains: no mismatch
    assert model.training and model[1].training


def test_inputs_that_do_not_fit_are_an_input_error():
    with pytest.raises(normfx.errors.InputDataError, match="example inputs do not run"):
        normfx.lint(_conv_bn(), torch.randn(1, 5, 8, 8))


def test_not_a_model():
    with pytest.raises(normfx.errors.ModelError, match="cannot lint"):
        normfx.lint(42)


def test_untraceable_part_is_said():
    report = normfx.lint(models.create("trap_untraceable"), models.example_input("trap_untraceable"))
    assert [f.layer for f in report.findings if f.check == "structure"] == ["gate"]
    assert report.on("gate.bn", "fold")[0].severity == "info"


# --- ONNX --------------------------------------------------------------------------------------------------------


def onnx_devils() -> onnx.ModelProto:
    """Conv → BN chains on one input, each BN with one devil; ``clean_bn`` has none."""
    b = Builder(seed=3, opset=15)
    x = b.input("x", [1, 4, 8, 8])

    def conv_bn(x_in, name, **bn_attrs):
        y = b.conv(x_in, 4, 4, 3, pads=[1, 1, 1, 1], bias=False, name=f"{name}_conv")
        return b.bn(y, 4, name=name, **bn_attrs)

    y = conv_bn(x, "clean_bn")
    y = conv_bn(y, "eps_bn", eps=1e-8)
    y = conv_bn(y, "nan_bn")
    y = conv_bn(y, "negvar_bn")
    y = conv_bn(y, "overflow_bn")
    y = conv_bn(y, "precision_bn")
    y = b.node("Relu", [y])
    y = b.bn(y, 4, name="standalone_bn")
    y = b.node("Add", [y, x])
    y = b.bn(y, 4, name="train_bn", training_mode=1)
    b.output(y)
    model = b.model()
    inits = {t.name: t for t in model.graph.initializer}

    def edit(node_name, slot, fn):
        node = next(n for n in model.graph.node if n.name == node_name)
        tensor = inits[node.input[slot]]
        tensor.CopyFrom(onnx.numpy_helper.from_array(fn(onnx.numpy_helper.to_array(tensor).copy()), tensor.name))

    edit("nan_bn", 3, lambda a: np.where(np.arange(4) == 1, np.nan, a).astype(np.float32))
    edit("negvar_bn", 4, lambda a: np.where(np.arange(4) == 2, -0.5, a).astype(np.float32))
    edit("overflow_bn_conv", 1, lambda a: (a * 1000 / np.abs(a).max()).astype(np.float32))
    edit("overflow_bn", 1, lambda a: np.ones_like(a))
    edit("overflow_bn", 4, lambda a: np.full_like(a, 1e-4 - 1e-5))
    edit("precision_bn", 1, lambda a: np.where(np.arange(4) == 3, 5.0, a).astype(np.float32))
    edit("precision_bn", 4, lambda a: np.where(np.arange(4) == 3, 1e-6, a).astype(np.float32))
    return model


ONNX_DEVILS = [
    ("eps_bn", "eps", "warning"),
    ("nan_bn", "statistics", "error"),
    ("negvar_bn", "running_var", "error"),
    ("overflow_bn", "fold_fp16_overflow", "warning"),
    ("precision_bn", "fold_precision", "warning"),
    ("standalone_bn", "fold", "info"),
    ("train_bn", "training_mode", "error"),
    ("train_bn", "fold", "info"),
]


def test_onnx_devils(tmp_path):
    model = onnx_devils()
    path = tmp_path / "devils.onnx"
    onnx.save(model, path)
    raw = path.read_bytes()
    for subject in (model, str(path)):
        report = normfx.lint(subject)
        assert report.kind == "onnx" and report.layers == 8
        for layer, check, severity in ONNX_DEVILS:
            assert _has(report, layer, check, severity), f"{check} on {layer}:\n{report}"
        expected = sorted((c, layer, s) for layer, c, s in ONNX_DEVILS if s != "info")
        assert _serious(report) == expected
        assert not report.on("clean_bn")
    assert path.read_bytes() == raw
    overflow = report.on("overflow_bn", "fold_fp16_overflow")[0]
    assert overflow.details["into"] == "overflow_bn_conv" and overflow.details["max_abs"] > 65504
    assert report.on("eps_bn", "eps")[0].fix == "normfx rewrite --model MODEL --policy fuse --out fused.onnx"


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_onnx_training_mode_export():
    """A real torch.onnx export of a model in training mode: BatchNormalization nodes with training_mode=1."""
    model = models.create("resnet18")
    buffer = io.BytesIO()
    torch.onnx.export(model.train(), (models.example_input("resnet18", batch=2),), buffer, dynamo=False,
                      training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False, opset_version=15)
    report = normfx.lint(onnx.load_from_string(buffer.getvalue()))
    flagged = [f for f in report.findings if f.check == "training_mode"]
    assert len(flagged) == report.layers == 20 and all(f.severity == "error" for f in flagged)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", ["resnet18", "bn_conv", "mlp"])
def test_onnx_clean_exports(name):
    model = models.create(name)
    buffer = io.BytesIO()
    torch.onnx.export(model, (models.example_input(name, batch=2),), buffer, dynamo=False, do_constant_folding=False,
                      opset_version=17)
    report = normfx.lint(onnx.load_from_string(buffer.getvalue()))
    assert report.layers > 0 and not report.warnings and not report.errors, str(report)
    unfoldable = [f.layer for f in report.findings if f.check == "fold"]
    assert len(unfoldable) == (5 if name == "bn_conv" else 0)


@pytest.mark.parametrize("gamma, var, conv_max, checks", [
    (1.0, 1e-4 - 1e-5, 600.0, set()),                           # W·γ/σ = 6e4 < 65504, γ/σ = 100
    (1.0, 1e-4 - 1e-5, 700.0, {"fold_fp16_overflow"}),         # 7e4
    (10.0, 1e-4 - 1e-5, 1.0, set()),                            # γ/σ = 1000 < 1024
    (11.0, 1e-4 - 1e-5, 1.0, {"fold_precision"}),               # γ/σ = 1100
])
def test_fold_range_thresholds(gamma, var, conv_max, checks):
    model = _conv_bn()
    with torch.no_grad():
        model[0].weight.mul_(conv_max / model[0].weight.abs().max())
        model[1].weight.fill_(gamma)
        model[1].running_var.fill_(var)
    report = normfx.lint(model, X)
    assert {f.check for f in report.findings if f.check.startswith("fold")} == checks


def test_onnx_opset13_training_outputs():
    """opset 7–13: declaring the running-statistics outputs selects training mode."""
    b = Builder(seed=0, opset=13)
    x = b.input("x", [2, 4, 8, 8])
    y = b.conv(x, 4, 4, 1, bias=False, name="conv")
    stats = [b.init(f"s{i}", v) for i, v in enumerate([np.ones(4, np.float32), np.zeros(4, np.float32),
                                                       np.zeros(4, np.float32), np.ones(4, np.float32)])]
    out = b.node("BatchNormalization", [y, *stats], n_out=3, name="bn", out=["y", "rm", "rv"])
    b.output(out[0])
    report = normfx.lint(b.model())
    assert _has(report, "bn", "training_mode", "error") and "opset 13" in report.on("bn", "training_mode")[0].message
