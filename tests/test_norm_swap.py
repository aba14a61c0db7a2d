"""Batch-independent normalization on the torch route: groupnorm / layernorm / instancenorm (module swaps),
proxynorm (BN → activation pairs become norm → ProxyNormAct), Weight Standardization (ws=true and the policy
weight_standardization); every zoo model converted, trained one step, exported; every skip and every bad option."""

import copy
import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_state_equal, rel_error, snapshot, storages
from torch import fx, nn

import normfx
from normfx import models
from normfx.errors import PolicyError
from normfx.layers import FrozenBatchNorm2d, GroupNormPost, is_batchnorm
from normfx.layers.proxynorm import ProxyNormAct
from normfx.layers.stdconv import StdConv, StdConv2d
from normfx.models import BatchNormAct2d

ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Sigmoid, nn.Tanh)
ACTIVATION_FUNCTIONS = (F.relu, torch.relu, F.silu, F.gelu, F.relu6, F.leaky_relu)


class _BnLeaf(fx.Tracer):
    def is_leaf_module(self, m, name):
        return is_batchnorm(m) or super().is_leaf_module(m, name)


def bn_act_pairs(model: nn.Module) -> int:
    """BN calls whose only user is an activation, or BN+activation subclasses (counted independently of normfx)."""
    gm = fx.GraphModule(model, _BnLeaf().trace(model))
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_module" or not is_batchnorm(gm.get_submodule(node.target)):
            continue
        if isinstance(gm.get_submodule(node.target), BatchNormAct2d):
            count += 1
            continue
        users = list(node.users)
        if len(users) != 1:
            continue
        user = users[0]
        if (user.op == "call_module" and isinstance(gm.get_submodule(user.target), ACTIVATION_MODULES)) or (
                user.op == "call_function" and user.target in ACTIVATION_FUNCTIONS):
            count += 1
    return count


def proxy_calls(model: nn.Module) -> int:
    return sum(1 for gm in model.modules() if isinstance(gm, fx.GraphModule) for n in gm.graph.nodes
               if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ProxyNormAct))


def ort_run(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy()})[0]


def float64_run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


def train_mode(model: nn.Module) -> nn.Module:
    """Train mode for the norms, dropout off (so batch-independence can be checked sample by sample)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    return model


# ---------------------------------------------------------------------------------------------- the zoo


@pytest.mark.parametrize("policy", ["proxynorm", "groupnorm"])
@pytest.mark.parametrize("name", [n for n in models.names() if "foreign_bn" not in models.info(n).tags])
def test_zoo_converts_trains_and_exports(name, policy):
    model = models.create(name, seed=1)
    x = models.example_input(name, batch=2, seed=1)
    before, owned = snapshot(model), storages(model)
    out, report = normfx.rewrite_with_report(model, policy, example_inputs=x)
    assert_state_equal(before, model)  # the caller's model is untouched and shares nothing
    assert not storages(out) & owned

    # every BN is converted or reported skipped with a reason; functional calls are the only skips in traceable models
    left = {n for n, m in out.named_modules() if is_batchnorm(m)}
    assert left == {e.name for e in report.skipped if e.details["source"] != "F.batch_norm"}
    assert all(e.reason for e in report.entries)
    if policy == "proxynorm":  # untraceable parts get the plain module swap: no BatchNorm module is left
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in out.modules())
    expected_skips = {"trap_functional_bn": 2}
    assert len(report.skipped) == expected_skips.get(name, 0)
    if name == "trap_functional_bn":
        assert all("functional batch_norm" in e.reason for e in report.skipped)
    assert report.applied and all(e.details["result"] for e in report.applied)
    if policy == "proxynorm" and "traceable" in models.info(name).tags:
        assert proxy_calls(out) == bn_act_pairs(model) == sum(e.details["activation"] is not None for e in report.applied
                                                              for _ in range(e.details["calls"]))

    # trains: forward and backward in train mode on a batch of 2, finite outputs and gradients
    train_mode(out)
    y = out(x)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    grads = [p.grad for p in out.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    if not left:  # batch-independent in train mode: a sample's output does not depend on the rest of the batch
        with torch.no_grad():
            assert rel_error(out(x)[:1], out(x[:1])) <= 1e-5

    # exports: ONNX (TorchScript exporter) in onnxruntime equals the torch eval run, to the fp32 noise floor
    out.eval()
    reference = float64_run(out, x)
    with torch.no_grad():
        floor = rel_error(reference, out(x))
    assert rel_error(reference, torch.from_numpy(ort_run(out, x))) <= max(1e-5, 2 * floor)


# ------------------------------------------------------------------------------------------- plain swaps


def _bn_net(bn: nn.Module, act: nn.Module | None = None) -> nn.Sequential:
    layers = [nn.Conv2d(3, bn.num_features, 3, padding=1, bias=False), bn] + ([act] if act is not None else [])
    net = nn.Sequential(*layers)
    models.randomize_batchnorm(net, 0)
    return net.eval()


@pytest.mark.parametrize("policy, groups", [("groupnorm", 4), ("layernorm", 1), ("instancenorm", 8),
                                            ("groupnorm:group_size=4", 2), ("groupnorm:groups=2", 2)])
def test_plain_swap_keeps_eps_and_affine_and_drops_statistics(policy, groups):
    net = _bn_net(nn.BatchNorm2d(8, eps=1e-3))
    bn = net[1]
    out, report = normfx.rewrite_with_report(net, policy)
    norm = out[1]
    assert type(norm) is nn.GroupNorm and norm.num_groups == groups and norm.eps == 1e-3 and norm.affine
    assert torch.equal(norm.weight, bn.weight) and torch.equal(norm.bias, bn.bias)
    assert not list(norm.buffers()) and isinstance(norm.weight, nn.Parameter)
    assert set(out.state_dict()) == {"0.weight", "1.weight", "1.bias"}  # BN's keys, statistics dropped
    x = torch.randn(2, 3, 6, 6)
    expected = F.group_norm(net[0](x), groups, bn.weight, bn.bias, 1e-3)
    assert rel_error(expected, out(x)) <= 1e-6
    assert type(out) is nn.Sequential  # module swap: the model keeps its class
    (entry,) = report.entries
    assert entry.status == "applied" and entry.reason.startswith("BatchNorm2d → GroupNorm(")
    assert entry.details["groups"] == groups and entry.details["modules"] == {"norm": "1"}


def test_default_group_rule_keeps_two_channels_per_group():
    for channels, expected in [(64, 32), (48, 24), (16, 8), (24, 12), (3, 1), (1, 1), (96, 32)]:
        out = normfx.rewrite(_bn_net(nn.BatchNorm2d(channels)), "groupnorm")
        assert out[1].num_groups == expected, channels
    for channels, expected in [(64, 4), (6, 3), (3, 1), (2, 1)]:
        out = normfx.rewrite(_bn_net(nn.BatchNorm2d(channels), nn.ReLU()), "proxynorm")
        assert out.get_submodule("1_norm").num_groups == expected, channels


def test_affine_false_frozen_sync_and_3d_sources():
    net = _bn_net(nn.BatchNorm2d(8, affine=False))
    assert not normfx.rewrite(net, "groupnorm")[1].affine
    pn = normfx.rewrite(_bn_net(nn.BatchNorm2d(8, affine=False), nn.ReLU()), "proxynorm")
    assert torch.equal(pn.get_submodule("1").weight, torch.ones(8)) and not pn.get_submodule("1_norm").affine
    frozen = normfx.rewrite(_bn_net(nn.BatchNorm2d(8)), "frozen")
    assert isinstance(frozen[1], FrozenBatchNorm2d)
    out = normfx.rewrite(frozen, "groupnorm")
    assert type(out[1]) is nn.GroupNorm and out[1].weight.requires_grad  # a Frozen BN's affine becomes trainable
    assert torch.equal(out[1].weight, frozen[1].weight)
    sync = normfx.rewrite(_bn_net(nn.SyncBatchNorm(8)), "groupnorm")  # 4-D: the conv before it proves the rank
    assert sync[1].num_groups == 4
    video = nn.Sequential(nn.Conv3d(2, 8, 3), nn.BatchNorm3d(8), nn.ReLU()).eval()
    out = normfx.rewrite(video, "proxynorm")
    x = torch.randn(2, 2, 4, 5, 5)
    assert torch.isfinite(out(x)).all() and proxy_calls(out) == 1


def test_group_norm_post_is_group_norm_then_its_post_modules_with_their_keys():
    norm = GroupNormPost(2, 4, 1e-3, post={"act": nn.PReLU(4), "drop": nn.Identity()})
    assert isinstance(norm, nn.GroupNorm) and norm.post_names == ("act", "drop")
    assert list(norm.state_dict()) == ["weight", "bias", "act.weight"]
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0), norm.bias.normal_(), norm.act.weight.uniform_(0.1, 0.3)
    x = torch.randn(3, 4, 5)
    ref = norm.act(F.group_norm(x, 2, norm.weight, norm.bias, 1e-3))
    assert torch.equal(norm(x), ref)
    plain = GroupNormPost(1, 4, affine=False)
    assert plain.post_names == () and not list(plain.state_dict())


def test_bn_act_subclass_keeps_its_activation():
    model = models.create("trap_bn_act")
    x = models.example_input("trap_bn_act", batch=2)
    out = normfx.rewrite(model, "groupnorm")
    assert all(type(out.get_submodule(n)) is GroupNormPost for n in ("bn1", "bn2", "bn3"))
    assert isinstance(out.bn2.act, nn.SiLU) and "bn2.act" not in out.state_dict()  # ReLU/SiLU have no state
    y = out.bn2(torch.randn(2, 32, 4, 4))
    assert (y.min() < 0) and torch.isfinite(y).all()  # SiLU dips below zero, ReLU does not
    assert out.bn2.num_groups == 16  # default for 32 channels
    expected = F.silu(F.group_norm(out.conv2(out.bn1(out.conv1(x))), 16, out.bn2.weight, out.bn2.bias, 1e-5))
    assert rel_error(expected, out.bn2(out.conv2(out.bn1(out.conv1(x))))) <= 1e-6

    pn, report = normfx.rewrite_with_report(model, "proxynorm")
    assert [type(pn.get_submodule(n).activation).__name__ for n in ("bn1", "bn2", "bn3")] == ["ReLU", "SiLU", "ReLU"]
    assert all(e.reason.endswith("ProxyNormAct(its own ReLU)") or e.reason.endswith("ProxyNormAct(its own SiLU)")
               for e in report.entries)
    assert torch.equal(pn.bn2.weight, model.bn2.weight) and torch.equal(pn.bn2.bias, model.bn2.bias)


class _ScaledBN(nn.BatchNorm2d):
    """A subclass whose forward is not BN + children: must be skipped, not silently replaced."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_subclass_with_another_forward_is_skipped():
    net = _bn_net(_ScaledBN(8), nn.ReLU())
    for policy in ("groupnorm", "proxynorm"):
        report = normfx.explain(net, policy)
        (entry,) = report.entries
        assert entry.status == "skipped" and "not BatchNorm followed by its child modules" in entry.reason
        out = normfx.rewrite(net, policy)
        assert isinstance(out.get_submodule("1"), _ScaledBN)


# ------------------------------------------------------------------------------------------------ options


@pytest.mark.parametrize("policy, words", [
    ("groupnorm:groups=3", "'conv1'|'bn1'.*16 channels, which groups=3 does not divide; valid group counts for it: "
                           "1, 2, 4, 8, 16"),
    ("groupnorm:group_size=3", "16 channels, which group_size=3 does not divide; valid group sizes for it: 1, 2, 4"),
    ("proxynorm:groups=32", "'bn1' has 16 channels, which groups=32 does not divide"),
    ("groupnorm:groups=4,group_size=4", "set groups or group_size, not both"),
    ("groupnorm:groups=-1", "groups must be >= 1"),
    ("proxynorm:group_size=-2", "group_size must be >= 1"),
    ("proxynorm:norm=batchnorm", "norm='batchnorm' is not one of groupnorm, layernorm"),
    ("proxynorm:norm=layernorm,groups=2", "norm=layernorm is GroupNorm with 1 group"),
    ("layernorm:groups=2", "unknown option.*valid options: ws"),
    ("weight_standardization:eps=0", "eps must be > 0"),
])
def test_bad_options_raise_policy_errors(policy, words):
    model = models.create("resnet18")
    before = snapshot(model)
    with pytest.raises(PolicyError, match=words):
        normfx.rewrite(model, policy)
    with pytest.raises(PolicyError, match=words):
        normfx.explain(model, policy)
    assert_state_equal(before, model)


def test_group_size_option_on_the_zoo():
    model = models.create("resnet18")
    out, report = normfx.rewrite_with_report(model, "groupnorm:group_size=8")
    norms = [m for m in out.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 20 and all(m.num_channels // m.num_groups == 8 for m in norms)
    assert all(e.details["group_rule"] == "group_size=8" for e in report.entries)
    pn = normfx.rewrite(model, "proxynorm:group_size=8")
    assert all(m.num_channels // m.num_groups == 8 for m in pn.modules() if isinstance(m, nn.GroupNorm))
    ln = normfx.rewrite(model, "proxynorm:norm=layernorm")
    assert all(m.num_groups == 1 for m in ln.modules() if isinstance(m, nn.GroupNorm))


def test_per_layer_overrides():
    model = models.create("resnet18")
    policy = {"layer1.*": "proxynorm", "*": "groupnorm:groups=2"}
    out, report = normfx.rewrite_with_report(model, policy)
    rules = {e.name: e.rule for e in report.entries}
    assert rules["layer1.0.bn1"] == "proxynorm" and rules["layer2.0.bn1"] == "groupnorm"
    assert isinstance(out.get_submodule("layer1.0.bn1"), ProxyNormAct)
    assert out.get_submodule("layer2.0.bn1").num_groups == 2
    assert not any(is_batchnorm(m) for m in out.modules())


# -------------------------------------------------------------------------------------------- 2-D inputs


def test_batchnorm1d_on_2d_input_needs_its_rank():
    model = models.create("mlp")
    x = models.example_input("mlp", batch=4)
    out, report = normfx.rewrite_with_report(model, "groupnorm", example_inputs=x)
    assert all(m.num_groups == 1 for m in out.modules() if isinstance(m, nn.GroupNorm))  # LayerNorm over features
    assert all("2-D (N, C) input" in e.reason for e in report.entries)
    expected = F.group_norm(x, 1, out.bn_in.weight, out.bn_in.bias, out.bn_in.eps)
    assert rel_error(expected, out.bn_in(x)) <= 1e-6

    unknown = normfx.explain(model, "groupnorm")  # no example_inputs: nothing proves the rank
    assert all(e.status == "skipped" and "pass example_inputs" in e.reason for e in unknown.entries)
    assert all(e.status == "applied" for e in normfx.explain(model, "layernorm").entries)  # right on any rank
    explicit = normfx.explain(model, "groupnorm:groups=4")
    assert all(e.status == "applied" and "rank not proven" in e.reason for e in explicit.entries)
    instance = normfx.explain(model, "instancenorm", example_inputs=x)
    assert all(e.status == "skipped" and "single value" in e.reason for e in instance.entries)
    conv1d = models.create("conv1d")  # BatchNorm1d after Conv1d: the conv proves (N, C, L)
    assert all(e.status == "applied" for e in normfx.explain(conv1d, "instancenorm").entries)


# ------------------------------------------------------------------------------------------------ proxynorm


class _Activations(nn.Module):
    """BNs followed by every kind of activation call, one BN before a residual add, one BN feeding two users."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(10))
        self.prelu = nn.PReLU(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.conv(x)
        b = self.bns
        y = F.relu(b[0](x)) + F.leaky_relu(b[1](x), 0.2) + b[2](x).clamp(0, 6) + F.gelu(b[3](x), approximate="tanh")
        y = y + self.prelu(b[4](x)) + self.prelu(b[5](x)) + torch.sigmoid(b[6](x)) + self.relu(b[7](x))
        z = b[8](x)
        return y + z + torch.relu(z) + b[9](x)


def test_every_activation_kind_is_absorbed():
    model = _Activations()
    models.randomize_batchnorm(model, 0)
    model.eval()
    out, report = normfx.rewrite_with_report(model, "proxynorm")
    reasons = {e.name: e.reason for e in report.entries}
    expected = {"bns.0": F.relu, "bns.1": lambda t: F.leaky_relu(t, 0.2), "bns.2": lambda t: t.clamp(0, 6),
                "bns.3": lambda t: F.gelu(t, approximate="tanh"), "bns.6": torch.sigmoid, "bns.7": F.relu}
    t = torch.linspace(-8, 8, 401).view(1, 1, -1).expand(1, 8, -1)
    for name, fn in expected.items():
        layer = out.get_submodule(name)
        assert isinstance(layer, ProxyNormAct), name
        assert torch.allclose(layer.activation(t), fn(t)), name
        assert not getattr(layer.activation, "inplace", False)
    assert out.get_submodule("bns.4").activation is out.get_submodule("bns.5").activation  # PReLU stays shared
    assert "bns.8" in reasons and "feeds 2 nodes" in reasons["bns.8"] and "with affine" in reasons["bns.8"]
    assert "residual" in reasons["bns.9"] and type(out.get_submodule("bns.9")) is nn.GroupNorm
    assert out.get_submodule("bns.9").affine and not out.get_submodule("bns.0_norm").affine
    x = torch.randn(2, 3, 6, 6)
    train_mode(out)
    out(x).sum().backward()
    assert out.get_submodule("bns.4").activation.weight.grad is not None


def test_shared_bn_same_activation_shares_modules_and_mixed_uses_keep_the_affine():
    model = models.create("trap_shared_bn")
    out, report = normfx.rewrite_with_report(model, "proxynorm")
    (entry,) = [e for e in report.entries if e.name == "bn"]
    assert entry.status == "applied" and entry.details["calls"] == 2 and proxy_calls(out) == 3
    assert torch.equal(out.bn.weight, model.bn.weight)

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x))) + self.bn(x.repeat(1, 3, 1, 1)[:, :8])

    out, report = normfx.rewrite_with_report(Mixed().eval(), "proxynorm")
    (entry,) = report.entries
    assert entry.status == "applied" and "called 2 times with different activations after it (ReLU, none)" in entry.reason
    assert type(out.bn) is nn.GroupNorm and out.bn.affine and proxy_calls(out) == 0
    assert any(n.target is F.relu for n in out.graph.nodes)  # the activation stays


def test_state_dict_keys_are_stable_and_documented():
    model = models.create("resnet18")
    out = normfx.rewrite(model, "proxynorm")
    keys = set(out.state_dict())
    assert {"bn1.weight", "bn1.bias", "bn1.proxy_weight", "bn1.proxy_bias"} <= keys  # BN γ, β keep their keys
    assert {"layer1.0.bn2.weight", "layer1.0.bn2.bias"} <= keys  # before the residual add: GroupNorm with affine
    assert not any(k.startswith("bn1_norm") for k in keys)  # the norm before ProxyNormAct has no parameters
    assert torch.equal(out.bn1.weight, model.bn1.weight) and not out.bn1.proxy_weight.any()
    assert not any("running_" in k for k in keys)
    again = normfx.rewrite(models.create("resnet18", seed=5), "proxynorm")
    again.load_state_dict(out.state_dict())  # a second conversion loads the first one's checkpoint
    x = models.example_input("resnet18", batch=2)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), out.eval()(x))


def test_untraceable_part_and_single_bn_model():
    model = models.create("trap_untraceable")
    x = models.example_input("trap_untraceable", batch=4)
    out, report = normfx.rewrite_with_report(model, "proxynorm", example_inputs=x)
    assert not report.skipped
    (entry,) = [e for e in report.entries if e.name == "gate.bn"]
    assert entry.status == "applied" and "torch.fx cannot trace 'gate'" in entry.reason
    assert "GroupNorm with affine, no ProxyNormAct" in entry.reason and entry.details["activation"] is None
    gate_norm = out.get_submodule("gate.bn")
    assert type(gate_norm) is nn.GroupNorm and gate_norm.affine
    assert not any(is_batchnorm(m) for m in out.modules())
    train_mode(out)
    with torch.no_grad():  # batch-independent in train mode: a sample's output ignores the rest of the batch
        torch.testing.assert_close(out(x)[:1], out(x[:1]), rtol=1e-4, atol=1e-5)
    assert normfx.explain(model, "groupnorm").applied_to("gate.bn")  # module swaps need no tracing
    bn = nn.BatchNorm2d(8).eval()
    out, report = normfx.rewrite_with_report(bn, "proxynorm")
    assert type(out) is nn.GroupNorm and out.affine and "single BatchNorm" in report.entries[0].reason
    out, report = normfx.rewrite_with_report(bn, "groupnorm")
    assert type(out) is nn.GroupNorm and [(e.name, e.status) for e in report.entries] == [("", "applied")]


# ------------------------------------------------------------------------------------ weight standardization


def test_ws_option_standardizes_the_conv_before_each_norm():
    model = models.create("resnet18")
    for policy in ("groupnorm:ws=true", "proxynorm:ws=true", "layernorm:ws=true"):
        out, report = normfx.rewrite_with_report(model, policy)
        std = [n for n, m in out.named_modules() if isinstance(m, StdConv)]
        assert len(std) == 20 == sum(len(e.details["ws_convs"]) for e in report.entries), policy
        assert isinstance(out.conv1, StdConv2d) and torch.equal(out.conv1.weight, model.conv1.weight)
        assert "conv 'conv1' → StdConv2d" in report.entries[0].reason
        assert set(out.state_dict()) >= {"conv1.weight", "layer1.0.conv1.weight"}

    report = normfx.explain(models.create("trap_shared_conv"), "groupnorm:ws=true")
    assert "conv 'shared' is called 2 times" in {e.name: e.reason for e in report.entries}["bn"]
    report = normfx.explain(models.create("unet"), "proxynorm:ws=true")
    assert any("ConvTranspose2d: Weight Standardization applies to Conv1d/2d/3d" in e.reason for e in report.entries)
    report = normfx.explain(models.create("preact_resnet"), "proxynorm:ws=true")
    assert any("no Weight Standardization: its input comes from an addition" in e.reason for e in report.entries)


def test_weight_standardization_policy_after_a_norm_policy():
    model = models.create("trap_shared_conv")
    x = models.example_input("trap_shared_conv", batch=2)
    out, report = normfx.rewrite_with_report(model, ["groupnorm", "weight_standardization"])
    ws = {e.name: e for e in report.entries if e.rule == "weight_standardization"}
    assert ws["stem.0"].status == "applied" and ws["branch.0"].status == "applied"
    assert ws["shared"].status == "skipped" and "called 2 times" in ws["shared"].reason
    assert isinstance(out.stem[0], StdConv2d) and type(out.shared) is nn.Conv2d
    assert torch.isfinite(out(x)).all()
    pn = normfx.rewrite(models.create("trap_bn_act"), ["groupnorm", "weight_standardization"])  # GroupNormPost
    assert all(isinstance(pn.get_submodule(n), StdConv2d) for n in ("conv1", "conv2", "conv3"))
    untouched = normfx.explain(model, "weight_standardization")  # BN model: nothing to do, and it says so
    assert not untouched.applied and any("no Conv → GroupNorm pair" in n for n in untouched.notes)


# ---------------------------------------------------------------------------------------------------- explain


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "trap_functional_bn", "trap_untraceable", "mlp"])
def test_explain_lists_every_bn_with_its_reason(name):
    model = models.create(name)
    x = models.example_input(name, batch=2)
    for policy in ("proxynorm:ws=true", "groupnorm", "instancenorm"):
        explained = normfx.explain(model, policy, example_inputs=x)
        _, report = normfx.rewrite_with_report(model, policy, example_inputs=x)
        rows = [(e.name, e.rule, e.status, e.reason) for e in report.entries]
        assert [(e.name, e.rule, e.status, e.reason) for e in explained.entries] == rows
        names = {e.name for e in report.entries}
        assert {n for n, m in model.named_modules() if is_batchnorm(m)} <= names
        assert all(e.reason for e in report.entries)
    text = str(normfx.explain(model, "proxynorm", example_inputs=x))
    assert "ProxyNormAct(" in text or name == "trap_untraceable"


def test_policies_are_registered_as_inexact_torch_policies():
    described = {d["name"]: d for d in normfx.policy.describe_policies()}
    for name in ("groupnorm", "layernorm", "instancenorm", "proxynorm", "weight_standardization"):
        assert described[name]["torch"] and not described[name]["onnx"] and not described[name]["exact"]
    assert set(described["proxynorm"]["options"]) == {"groups", "group_size", "norm", "ws"}
    assert set(described["groupnorm"]["options"]) == {"groups", "group_size", "ws"}


def test_export_of_an_inexact_policy_is_verified_against_its_torch_result(tmp_path):
    from normfx import models

    model = models.create("resnet18", seed=1)
    x = models.example_input("resnet18", batch=2)
    result = normfx.export(model, x, tmp_path / "pn.onnx", policy=["proxynorm", "fuse"])
    assert result.verification.ok and (tmp_path / "pn.onnx").exists()
    assert not any(n.op_type == "BatchNormalization" for n in result.model.graph.node)


def test_export_proves_the_fold_against_the_model_before_it(tmp_path, monkeypatch):
    """proxynorm then fuse: the export is checked against the proxynorm model, so a wrong fold is caught."""
    import normfx.passes.fx.proxy_norm_fold as fold_pass
    from normfx.errors import VerificationError

    model = models.create("resnet18", seed=1)
    x = models.example_input("resnet18", batch=2)
    original = fold_pass.proxy_norm_moments

    def wrong(layer):
        mean, inv_std = original(layer)
        return mean, inv_std * 1.5  # a broken fold

    monkeypatch.setattr(fold_pass, "proxy_norm_moments", wrong)
    with pytest.raises(VerificationError, match="nothing was written"):
        normfx.export(model, x, tmp_path / "bad.onnx", policy=["proxynorm", "fuse"])
    assert not (tmp_path / "bad.onnx").exists()
