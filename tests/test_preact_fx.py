"""Pre-activation fold on the torch.fx route (normfx/passes/fx/preact.py + offsets.py): BN → ReLU/ReLU6/LeakyReLU/
PReLU → conv/linear with the BN scale moved into the layer and the shift carried by the producing convs."""

import operator

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_error
from torch import fx, nn

import normfx
from normfx import models
from normfx.inspect import batchnorm_calls

#: BNs that stay, and why they must (see the reasons asserted below); every other pre-activation BN folds
KEPT = {"preact_resnet": 0, "densenet": 10, "dualpath": 5}


def _float64_reference(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The float64 output of the original and the original's own fp32 error against it."""
    import copy

    with torch.no_grad():
        y32 = model(x)
        y64 = copy.deepcopy(model).double()(x.double())
    return y64, rel_error(y64, y32)


def _constant_elementwise(gm: nn.Module) -> list[str]:
    """mul/add/sub/div calls with a get_attr constant operand, and functional batch norms, in every fx graph."""
    found = []
    for module in gm.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm):
                found.append(node.name)
            arithmetic = node.target in (operator.add, operator.mul, operator.sub, operator.truediv, torch.add,
                                         torch.mul, torch.sub, torch.div)
            if arithmetic and any(isinstance(a, fx.Node) and a.op == "get_attr" for a in node.args):
                found.append(node.name)
            if node.op == "call_method" and node.target in ("add", "mul", "sub", "div", "add_", "mul_"):
                found.append(node.name)
    return found


@pytest.mark.parametrize("name", sorted(KEPT))
def test_zoo_preactivation_models_fold_all_but_the_reasoned_bns(name):
    model = models.create(name, seed=3)
    x = models.example_input(name, batch=2, seed=3)
    y64, floor = _float64_reference(model, x)
    before = normfx.explain(model, "fuse", example_inputs=x)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    with torch.no_grad():
        error = rel_error(y64, fused(x))
    assert error <= max(1e-5, 2 * floor), (error, floor)
    assert batchnorm_calls(fused) == KEPT[name] == len(report.skipped)
    assert not _constant_elementwise(fused)
    folded = [e for e in report.applied if e.details.get("direction") == "pre-activation"]
    assert folded and all(e.reason.startswith("pre-activation: scale into") and "shift carried by" in e.reason
                          for e in folded)
    for entry in report.skipped:
        assert entry.reason.startswith("pre-activation BN kept: its input channel")
        assert "comes from ReLU" in entry.reason or "needs (a different one)" in entry.reason
    assert report.names() == before.names()


def test_preact_resnet_keeps_no_bn_and_no_bn_derived_op_in_the_fx_graph():
    model = models.create("preact_resnet", seed=4)
    x = models.example_input("preact_resnet", batch=2, seed=4)
    fused = normfx.rewrite(model, "fuse", example_inputs=x)
    nodes = list(fused.graph.nodes)
    assert not [n for n in nodes if n.op == "call_module" and isinstance(fused.get_submodule(n.target), nn.BatchNorm2d)]
    assert not _constant_elementwise(fused)
    adds = [n for n in nodes if n.target is operator.add]
    assert len(adds) == 8  # the residual additions, nothing else
    activations = [n for n in nodes if n.target in (torch.relu, torch.clamp)
                   or (n.op == "call_module" and isinstance(fused.get_submodule(n.target), nn.ReLU))]
    assert len(activations) == 17  # one per original ReLU: a clamp where a BN channel scale was negative


class _Block(nn.Module):
    """stem conv → residual add with a second conv → BN → activation → conv; the BN reads the sum."""

    def __init__(self, act: nn.Module, padding: int = 0, c: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.branch = nn.Conv2d(c, c, 1)
        self.bn = nn.BatchNorm2d(c)
        self.act = act
        self.head = nn.Conv2d(c, 4, 3 if padding else 1, padding=padding)

    def forward(self, x):
        h = self.stem(x)
        return self.head(self.act(self.bn(h + self.branch(h))))


def _randomized_block(act: nn.Module, padding: int = 0, zero_shift_sign: float = -1.0) -> nn.Module:
    model = _Block(act, padding)
    models.randomize_batchnorm(model, 7)
    with torch.no_grad():
        model.bn.weight[:3] = torch.tensor([1.2, -0.8, 0.0])  # s > 0, s < 0, s = 0
        model.bn.bias[2] = zero_shift_sign * abs(float(model.bn.bias[2])) - 0.1 * (zero_shift_sign < 0)
    return model.eval()


ACTIVATIONS = {
    "ReLU": lambda: nn.ReLU(inplace=True),
    "ReLU6": lambda: nn.ReLU6(),
    "LeakyReLU": lambda: nn.LeakyReLU(0.1),
    "PReLU": lambda: _prelu(),
}


def _prelu() -> nn.PReLU:
    prelu = nn.PReLU(6)
    with torch.no_grad():
        prelu.weight.copy_(torch.tensor([0.2, -0.3, 0.1, 0.4, 0.25, 0.05]))
    return prelu


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_each_activation_with_positive_negative_and_zero_scales_folds_exactly(act):
    model = _randomized_block(ACTIVATIONS[act]())
    x = torch.randn(2, 3, 9, 9)
    y64, floor = _float64_reference(model, x)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    entry = next(e for e in report.entries if e.name == "bn")
    assert entry.status == "applied" and "pre-activation: scale into head, shift carried by 'branch', 'stem'" in entry.reason
    assert batchnorm_calls(fused) == 0 and not _constant_elementwise(fused)
    with torch.no_grad():
        assert rel_error(y64, fused(x)) <= max(1e-5, 2 * floor)


def test_zero_scale_channel_with_a_nonzero_constant_before_a_padded_conv_is_declined_with_the_reason():
    model = _randomized_block(nn.LeakyReLU(0.1), padding=1, zero_shift_sign=1.0)  # leaky(t) ≠ 0 on a zero channel
    x = torch.randn(2, 3, 9, 9)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    entry = next(e for e in report.entries if e.name == "bn")
    assert entry.status == "skipped"
    assert "BN scale 0 is the constant act(shift) ≠ 0, which is not a bias through zero padding" in entry.reason
    with torch.no_grad():
        assert rel_error(model(x), fused(x)) <= 1e-5


def test_relu_before_a_padded_conv_folds_exactly_with_negative_channels():
    model = _randomized_block(nn.ReLU(), padding=1)
    x = torch.randn(2, 3, 9, 9)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    assert report.applied_to("bn") and batchnorm_calls(fused) == 0
    with torch.no_grad():
        assert rel_error(model(x), fused(x)) <= 1e-5


class _OnInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.bn(x)))


class _AfterSigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        h = torch.sigmoid(self.stem(x))
        return self.conv(F.relu(self.bn(h + h)))


@pytest.mark.parametrize("model,where", [(_OnInput(), "the model input 'x'"), (_AfterSigmoid(), "sigmoid()")])
def test_offset_that_no_conv_can_carry_keeps_the_bn_with_the_reason(model, where):
    models.randomize_batchnorm(model, 3)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    entry = next(e for e in report.entries if e.name == "bn")
    assert entry.status == "skipped"
    assert entry.reason.startswith("pre-activation BN kept: its input channel 0 comes from " + where)
    assert batchnorm_calls(fused) == 1
    with torch.no_grad():
        assert rel_error(model(x), fused(x)) <= 1e-5


class _SiLUAfterSum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.conv(F.silu(self.bn(self.a(x) + self.b(x))))


def test_non_homogeneous_activation_is_not_a_preactivation_site():
    model = models.randomize_batchnorm(_SiLUAfterSum(), 2).eval()
    report = normfx.explain(model, "fuse", example_inputs=torch.randn(1, 3, 4, 4))
    entry = next(e for e in report.entries if e.name == "bn")
    assert entry.status == "skipped"
    assert "not a pre-activation fold: silu() is not ReLU/ReLU6/LeakyReLU/PReLU" in entry.reason


def test_carried_offset_is_compensated_at_other_readers():
    """The summed tensor is also read by an unpadded conv (bias compensates), a padded conv (offset must be 0:
    the solver puts the offset on the branch only where the sum's other readers allow) and the output."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 5, 3, padding=1)
            self.bn = nn.BatchNorm2d(5)
            self.head = nn.Conv2d(5, 5, 1)
            self.side = nn.Conv2d(5, 2, 1)

        def forward(self, x):
            h = self.stem(x)
            y = h + self.head(torch.relu(self.bn(h)))
            return y, self.side(h)

    model = models.randomize_batchnorm(Net(), 11).eval()
    x = torch.randn(2, 3, 7, 7)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    assert report.applied_to("bn")
    with torch.no_grad():
        for a, b in zip(model(x), fused(x)):
            assert rel_error(a, b) <= 1e-5


def test_caller_model_is_untouched():
    model = models.create("preact_resnet", seed=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    normfx.rewrite(model, "fuse", example_inputs=models.example_input("preact_resnet"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_zero_padded_conv_reading_the_stream_needs_offset_zero_so_the_bn_is_kept():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 5, 1)
            self.bn = nn.BatchNorm2d(5)
            self.head = nn.Conv2d(5, 5, 1)
            self.side = nn.Conv2d(5, 2, 3, padding=1)  # sees padding zeros: an offset is not a bias at the border

        def forward(self, x):
            h = self.stem(x)
            return self.head(torch.relu(self.bn(h))) + self.side(h).sum()

    model = models.randomize_batchnorm(Net(), 12).eval()
    x = torch.randn(2, 3, 6, 6)
    fused, report = normfx.rewrite_with_report(model, "fuse", example_inputs=x)
    entry = next(e for e in report.entries if e.name == "bn")
    assert entry.status == "skipped"
    assert "already carries the offset Conv2d 'side' needs (a different one)" in entry.reason
    with torch.no_grad():
        assert rel_error(model(x), fused(x)) <= 1e-5


def test_without_example_inputs_the_classifier_after_flatten_still_takes_the_scale():
    model = models.create("preact_resnet", seed=6)
    x = models.example_input("preact_resnet", batch=2, seed=6)
    fused, report = normfx.rewrite_with_report(model, "fuse")
    assert batchnorm_calls(fused) == 0 and not report.skipped
    with torch.no_grad():
        assert rel_error(model(x), fused(x)) <= 1e-5
