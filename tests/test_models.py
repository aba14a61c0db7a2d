"""The built-in zoo: determinism, randomized BN statistics, well-scaled outputs, traceability, and
tags that match the models' graphs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import symbolic_trace
from torch.fx.proxy import TraceError

from normfx import models as zoo
from normfx.errors import InputDataError, ModelError, NormfxError
from normfx.layers import FrozenBatchNorm2d
from normfx.models import BatchNormAct2d, bn_like_tensors, randomize_batchnorm

NAMES = zoo.names()
EXPECTED = {
    "resnet18", "resnet50", "preact_resnet", "mobilenet_v2", "efficientnet_b0", "densenet", "unet", "conv1d",
    "conv3d", "mlp", "bn_conv", "trap_bn_act", "trap_functional_bn", "trap_shared_conv", "trap_shared_bn",
    "trap_untraceable", "trap_syncbn", "trap_foreign_frozen",
    "repvgg", "mobileone", "mixconv", "dualpath",
    "deep_silu",
}
AFFINE = (nn.modules.conv._ConvNd, nn.Linear)
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU)


@pytest.fixture(scope="module")
def built() -> dict[str, nn.Module]:
    """One seed-0 instance per model, shared by the read-only tests."""
    return {name: zoo.create(name) for name in NAMES}


def _bn_layers(model: nn.Module) -> list[tuple[str, tuple]]:
    return [(name, t) for name, m in model.named_modules() if (t := bn_like_tensors(m)) is not None]


# --- catalog ---------------------------------------------------------------------------------------


def test_catalog_names_info_and_default():
    assert set(NAMES) == EXPECTED and len(NAMES) == len(EXPECTED)
    assert zoo.DEFAULT_MODEL == "resnet18" and zoo.DEFAULT_MODEL in NAMES
    for name in NAMES:
        meta = zoo.info(name)
        assert meta.name == name and meta.description
        assert isinstance(meta.tags, frozenset) and meta.tags <= set(zoo.TAGS)
        assert ("traceable" in meta.tags) != ("untraceable" in meta.tags)
        assert ("trap" in meta.tags) == name.startswith("trap_")
        assert all(isinstance(d, int) and d > 0 for d in meta.input_shape)
    assert set(zoo.__all__) <= set(dir(zoo))
    for name in NAMES:  # the module docstring lists every model
        assert f"``{name}``" in zoo.__doc__


@pytest.mark.parametrize("call", [zoo.create, zoo.info, zoo.example_input])
def test_unknown_name_raises_model_error_listing_names(call):
    with pytest.raises(ModelError) as excinfo:
        call("resnet19")
    message = str(excinfo.value)
    assert isinstance(excinfo.value, NormfxError)
    assert "resnet19" in message and "\n" not in message
    assert all(name in message for name in NAMES)


def test_example_input_rejects_bad_batch():
    for batch in (0, -1, 1.5):
        with pytest.raises(InputDataError):
            zoo.example_input("mlp", batch=batch)


# --- per model -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_create_is_deterministic_per_seed_and_private(name):
    rng_before = torch.get_rng_state()
    a, b, c = zoo.create(name, seed=0), zoo.create(name, seed=0), zoo.create(name, seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before), "create must not consume the global RNG"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert list(sa) == list(sb) == list(sc)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    differing = [k for k in sa if sa[k].is_floating_point() and not torch.equal(sa[k], sc[k])]
    floating = [k for k in sa if sa[k].is_floating_point()]
    assert differing == floating, f"seed 1 left these unchanged: {sorted(set(floating) - set(differing))}"
    # new modules: no storage shared between two instances
    assert not {t.data_ptr() for t in sa.values() if t.numel()} & {t.data_ptr() for t in sb.values() if t.numel()}
    assert not any(m.training for m in a.modules())


@pytest.mark.parametrize("name", NAMES)
def test_batchnorm_statistics_are_randomized(name, built):
    layers = _bn_layers(built[name])
    assert layers, "every zoo model has BN layers"
    for layer, (mean, var, weight, bias) in layers:
        assert mean is not None and var is not None and weight is not None and bias is not None, layer
        assert (mean != 0).all() and mean.abs().max() < 0.3 * 6, layer
        assert (var != 1).all() and (var >= 0.5).all() and (var <= 2.0).all(), layer
        assert (weight.abs() >= 0.5).all() and (weight.abs() <= 1.5).all(), layer
        negative = int((weight < 0).sum())
        assert 1 <= negative <= max(1, round(0.1 * weight.numel())), layer
        assert (bias != 0).all(), layer
    for layer, module in built[name].named_modules():
        if isinstance(module, AFFINE) and module.bias is not None:
            assert (module.bias != 0).all(), layer


@pytest.mark.parametrize("name", NAMES)
def test_forward_is_finite_nonzero_and_well_scaled(name, built):
    model = built[name]
    x = zoo.example_input(name, batch=2, seed=5)
    assert x.shape == (2, *zoo.info(name).input_shape) and x.dtype == torch.float32
    stds: list[tuple[str, float]] = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out, n=n: stds.append((n, float(out.std()))))
        for n, m in model.named_modules()
        if isinstance(m, AFFINE) or bn_like_tensors(m) is not None
    ]
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in hooks:
            h.remove()
    assert y.shape[0] == 2 and torch.isfinite(y).all() and y.abs().max() > 0
    assert not torch.equal(y[0], y[1]), "outputs must depend on the input"
    # no blow-up and no vanishing through depth: every conv/linear/BN output is O(1)
    bad = [(n, s) for n, s in stds if not 0.25 < s < 4.0]
    assert stds and not bad, bad


@pytest.mark.parametrize("name", NAMES)
def test_example_input_shape_and_determinism(name):
    shape = zoo.info(name).input_shape
    x = zoo.example_input(name)
    assert x.shape == (1, *shape)
    assert zoo.example_input(name, batch=3, seed=4).shape == (3, *shape)
    assert torch.equal(zoo.example_input(name, 2, seed=4), zoo.example_input(name, 2, seed=4))
    assert not torch.equal(zoo.example_input(name, 2, seed=4), zoo.example_input(name, 2, seed=5))


@pytest.mark.parametrize("name", NAMES)
def test_fx_traceability_matches_tags(name, built):
    model = built[name]
    if "traceable" in zoo.info(name).tags:
        traced = symbolic_trace(model)
        x = zoo.example_input(name, batch=2)
        with torch.no_grad():
            assert torch.equal(traced(x), model(x))
    else:
        with pytest.raises(TraceError):
            symbolic_trace(model)


# --- tags agree with the graphs -----------------------------------------------------------------------


def _graph_tags(model: nn.Module) -> set[str]:
    """The structural tags, recomputed from the model's fx graph (see normfx.models.TAGS)."""
    gm = symbolic_trace(model)
    modules = dict(gm.named_modules())

    def module(node):
        return modules[node.target] if node.op == "call_module" else None

    def is_bn(node) -> bool:
        if node.op == "call_function":
            return node.target in (F.batch_norm, torch.batch_norm)
        return node.op == "call_module" and bn_like_tensors(module(node)) is not None

    def is_affine(node, kinds=AFFINE) -> bool:
        return isinstance(module(node), kinds)

    def is_act(node) -> bool:
        return isinstance(module(node), ACTIVATIONS) or (
            node.op == "call_function" and node.target in (F.relu, torch.relu, F.relu6, F.silu)
        )

    bns = [n for n in gm.graph.nodes if is_bn(n)]
    assert bns
    def after_conv(n) -> bool:
        return is_affine(n.args[0]) and len(n.args[0].users) == 1

    tags = set()
    if all(after_conv(n) for n in bns):
        tags.add("all_bn_after_conv")
    if any(not after_conv(n) and len(n.users) == 1 and is_affine(next(iter(n.users))) for n in bns):
        tags.add("forward_fold")
    for n in bns:
        users = list(n.users)
        if not is_affine(n.args[0]) and users and all(is_act(u) for u in users):
            if any(is_affine(v, nn.modules.conv._ConvNd) for u in users for v in u.users):
                tags.add("preact")
    if any(is_affine(n.args[0], nn.modules.conv._ConvTransposeNd) for n in bns):
        tags.add("conv_transpose")
    kinds = {type(m) for m in modules.values()}
    if nn.Conv1d in kinds and nn.BatchNorm1d in kinds:
        tags.add("1d")
    if nn.Conv3d in kinds and nn.BatchNorm3d in kinds:
        tags.add("3d")
    after_linear = any(is_affine(n.args[0], nn.Linear) for n in bns)
    before_linear = any(is_affine(u, nn.Linear) for n in bns for u in n.users)
    if after_linear and before_linear:
        tags.add("linear")
    return tags


STRUCTURAL = {"all_bn_after_conv", "forward_fold", "preact", "conv_transpose", "1d", "3d", "linear"}


@pytest.mark.parametrize("name", [n for n in NAMES if "traceable" in zoo.info(n).tags])
def test_structural_tags_match_the_graph(name, built):
    assert _graph_tags(built[name]) == zoo.info(name).tags & STRUCTURAL


def test_untraceable_model_tags_and_its_inner_bn():
    tags = zoo.info("trap_untraceable").tags
    assert tags == {"untraceable", "trap"}
    model = zoo.create("trap_untraceable")
    # traceable once the data-dependent block is a leaf; that leaf holds a conv+BN a fold cannot see
    leaf = type(model.gate)

    class LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, leaf) or super().is_leaf_module(m, qualname)

    graph = LeafTracer().trace(model)
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    assert "gate" in called and "gate.bn" not in called and "stem.1" in called
    # both branches of the data-dependent block are reachable
    with torch.no_grad():
        y = model.gate.bn(model.gate.conv(torch.ones(1, 16, 4, 4)))
        assert torch.equal(model.gate(torch.ones(1, 16, 4, 4)), torch.relu(y) if y.sum() > 0 else torch.relu(-y))


# --- the traps do what their names say ----------------------------------------------------------------


def _call_counts(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    counts: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda *a, n=n: counts.__setitem__(n, counts.get(n, 0) + 1))
             for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return counts


def test_shared_module_traps_call_their_module_twice(built):
    counts = _call_counts(built["trap_shared_conv"], zoo.example_input("trap_shared_conv"))
    assert counts["shared"] == 2 and counts["bn"] == 1
    counts = _call_counts(built["trap_shared_bn"], zoo.example_input("trap_shared_bn"))
    assert counts["bn"] == 2 and counts["conv_a"] == counts["conv_b"] == 1


def test_trap_layers_are_the_advertised_kinds(built):
    assert any(type(m) is nn.SyncBatchNorm for m in built["trap_syncbn"].modules())
    bn_acts = [m for m in built["trap_bn_act"].modules() if isinstance(m, BatchNormAct2d)]
    assert len(bn_acts) == 3 and {type(m.act) for m in bn_acts} == {nn.ReLU, nn.SiLU}
    functional = built["trap_functional_bn"]
    bn_modules = [n for n, m in functional.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bn_modules == ["stem.1"], "the other BNs are functional"
    transposes = [m for m in built["unet"].modules() if isinstance(m, nn.ConvTranspose2d)]
    assert {(m.groups > 1, m.bias is not None) for m in transposes} == {(False, False), (True, True)}
    convs = {n: m for n, m in built["bn_conv"].named_modules() if isinstance(m, nn.Conv2d)}
    assert convs["conv0"].kernel_size == (1, 1) and convs["conv0"].padding == (0, 0)
    assert convs["conv1"].padding == (1, 1) and convs["conv2"].groups == convs["conv2"].in_channels
    assert 1 < convs["conv3"].groups < convs["conv3"].in_channels
    assert convs["conv4"].stride == (2, 2) and convs["conv5"].dilation == (2, 2)


@pytest.mark.parametrize("training", [False, True])
def test_batchnorm_act_matches_batchnorm_then_activation(training):
    torch.manual_seed(0)
    ours = BatchNormAct2d(6, act_layer=nn.SiLU)
    randomize_batchnorm(ours, 3)
    ref = nn.BatchNorm2d(6)
    ref.load_state_dict(ours.state_dict())
    ours.train(training)
    ref.train(training)
    x = torch.randn(4, 6, 5, 5)
    torch.testing.assert_close(ours(x), F.silu(ref(x)), rtol=0, atol=0)
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


# --- randomize_batchnorm ------------------------------------------------------------------------------


def test_randomize_batchnorm_distributions_and_layer_kinds():
    model = nn.Sequential(
        nn.Conv2d(3, 4096, 1, bias=True),
        nn.BatchNorm2d(4096),
        FrozenBatchNorm2d(4096),
        nn.BatchNorm2d(8, affine=False),
        nn.BatchNorm2d(8, track_running_stats=False),
        nn.Linear(8, 8, bias=False),
    )
    assert randomize_batchnorm(model, 11) is model
    bn, frozen, no_affine, no_stats = model[1], model[2], model[3], model[4]
    for layer in (bn, frozen):
        mean, var, gamma, beta = (t.detach().double() for t in bn_like_tensors(layer))
        assert math.isclose(float(mean.std()), 0.3, rel_tol=0.05) and abs(float(mean.mean())) < 0.03
        assert 0.5 <= float(var.min()) and float(var.max()) <= 2.0
        assert math.isclose(float(var.mean()), 1.25, rel_tol=0.03)
        assert 0.5 <= float(gamma.abs().min()) and float(gamma.abs().max()) <= 1.5
        assert int((gamma < 0).sum()) == round(0.1 * 4096)
        assert math.isclose(float(beta.std()), 0.2, rel_tol=0.05)
    assert not torch.equal(bn.running_mean, frozen.running_mean)
    assert no_affine.weight is None and (no_affine.running_mean != 0).all() and (no_affine.running_var != 1).all()
    assert no_stats.running_mean is None and (no_stats.weight < 0).any() and (no_stats.bias != 0).all()
    assert (model[0].bias != 0).all() and math.isclose(float(model[0].bias.detach().std()), 0.2, rel_tol=0.05)
    # an int seed and a generator seeded alike give the same numbers
    again = randomize_batchnorm(nn.BatchNorm2d(5), torch.Generator().manual_seed(2))
    assert torch.equal(again.weight, randomize_batchnorm(nn.BatchNorm2d(5), 2).weight)


def test_functional_bn_tensors_are_randomized(built):
    blocks = [m for m in built["trap_functional_bn"].modules() if hasattr(m, "bn_tensor_names")]
    assert len(blocks) == 2
    for block in blocks:
        assert (block.rm != 0).all() and (block.rv != 1).all() and (block.w < 0).any() and (block.b != 0).all()
        assert isinstance(block.w, nn.Parameter) and "rm" in dict(block.named_buffers())
