"""The code normfx's fx rewrites generate reaches modules by ``_modules`` dictionary reads, not ``getattr`` chains,
and is otherwise the same model: same outputs, state_dict keys, copies, pickles, live submodule replacement."""

import copy
import io
import re

import pytest
import torch
from helpers import rel_error
from torch import fx, nn

import normfx
from normfx import models
from normfx.passes.fx.codegen import DirectModuleAccess, use_direct_module_access

MODELS = ["mobileone", "repvgg", "densenet", "preact_resnet", "mixconv", "dualpath", "resnet18", "unet"]


def _fused(name: str) -> tuple[nn.Module, fx.GraphModule, torch.Tensor]:
    model = models.create(name, seed=3)
    x = models.example_input(name, batch=2, seed=3)
    return model, normfx.rewrite(model, "fuse", example_inputs=x), x


def _plain_code_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """The same graph module with torch.fx's own code generator."""
    plain = copy.deepcopy(gm)
    plain.graph.set_codegen(fx.graph.CodeGen())
    plain.recompile()
    return plain


@pytest.mark.parametrize("name", MODELS)
def test_fused_code_has_no_getattr_chain_and_the_same_outputs(name):
    model, fused, x = _fused(name)
    assert isinstance(fused.graph._codegen, DirectModuleAccess)
    assert "getattr(" not in fused.code
    calls = [n for n in fused.graph.nodes if n.op == "call_module"]
    assert len(re.findall(r"self\._modules\[", fused.code)) >= len(calls) > 0
    plain = _plain_code_copy(fused)
    assert plain.state_dict().keys() == fused.state_dict().keys()
    with torch.no_grad():
        reference, y, y_plain = model(x), fused(x), plain(x)
    assert torch.equal(y, y_plain)  # the same computation, only the lookups differ
    assert rel_error(reference, y) <= 1e-5


def test_get_attr_of_nested_buffers_reads_through_modules():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Conv2d(3, 4, 3))
            self.inner.register_buffer("gain", torch.full((1, 4, 1, 1), 2.0))
            self.inner.register_buffer("gain_1", torch.full((1, 4, 1, 1), 3.0))

        def forward(self, x):
            return self.inner(x) * self.inner.gain + self.inner.gain_1

    gm = fx.symbolic_trace(Scaled())
    x = torch.randn(1, 3, 8, 8)
    expected = gm(x)
    use_direct_module_access(gm)
    assert "self._modules['inner'].gain_1\n" in gm.code and "self._modules['inner'].gain\n" in gm.code
    assert torch.equal(gm(x), expected)


def test_a_submodule_replaced_after_the_rewrite_is_the_one_called():
    _, fused, x = _fused("mobileone")
    with torch.no_grad():
        before = fused(x)
    target = next(n.target for n in fused.graph.nodes if n.op == "call_module")
    owner, _, leaf = target.rpartition(".")
    swapped = copy.deepcopy(fused.get_submodule(target))
    with torch.no_grad():
        swapped.weight.mul_(-1.5)
    fused.get_submodule(owner).register_module(leaf, swapped)  # e.g. a user swapping the stem
    with torch.no_grad():
        y = fused(x)
    assert not torch.allclose(y, before)
    plain = _plain_code_copy(fused)
    with torch.no_grad():
        assert torch.equal(y, plain(x))


def test_deepcopy_pickle_and_torch_save_keep_working():
    """The zoo models annotate ``x: "torch.Tensor"`` (string annotations): torch.save of a plain traced copy fails."""
    _, fused, x = _fused("repvgg")
    with torch.no_grad():
        expected = fused(x)
        clone = copy.deepcopy(fused)
        assert "getattr(" not in clone.code
        assert torch.equal(clone(x), expected)
        buffer = io.BytesIO()
        torch.save(fused, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert torch.equal(loaded(x), expected)


def test_unfuse_output_uses_direct_access_too():
    model = models.create("resnet18", seed=1)
    x = models.example_input("resnet18", batch=2, seed=1)
    fused = normfx.rewrite(model, "fuse", example_inputs=x)
    unfused = normfx.rewrite(fused, "unfuse", example_inputs=x)
    assert "getattr(" not in unfused.code
    with torch.no_grad():
        assert rel_error(fused(x), unfused.eval()(x)) <= 1e-5


def test_a_graph_with_its_own_code_generator_keeps_it():
    class Custom(fx.graph.CodeGen):
        pass

    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3)))
    gm.graph.set_codegen(Custom())
    use_direct_module_access(gm)
    assert type(gm.graph._codegen) is Custom
    assert torch.equal(gm(torch.ones(1, 3)), gm.get_submodule("0")(torch.ones(1, 3)))


def test_a_traced_part_generates_its_code_once_when_the_rewrite_ends():
    from normfx.passes.fx.codegen import is_deferred
    from normfx.passes.fx.tracing import rewrite_traceable_parts

    model = models.create("resnet18", seed=1).eval()
    x = models.example_input("resnet18", batch=2, seed=1)
    seen = []

    def look(part):  # a rewrite that leaves the graph as it is and does not finish it
        seen.append(part.graph_module)
        assert is_deferred(part.graph_module)
        with pytest.raises(RuntimeError, match="still being rewritten"):
            part.graph_module(x)
        return part.graph_module

    result = rewrite_traceable_parts(model, look, lambda path, why: None)
    assert seen == [result] and not is_deferred(result)
    assert isinstance(result.graph._codegen, DirectModuleAccess)
    with torch.no_grad():
        assert torch.equal(result(x), model(x))


class _UserNet(nn.Module):
    """A user model without string annotations (the zoo's have them, which TorchScript never accepted)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)))

    def forward(self, x):
        return self.body(x).relu()


def test_torch_jit_script_gets_torch_fx_code_and_the_same_function():
    model = _UserNet()
    models.randomize_batchnorm(model, 4)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    fused = normfx.rewrite(model, "fuse", example_inputs=x)
    assert "_modules[" in fused.code
    for candidate in (fused, copy.deepcopy(fused)):
        scripted = torch.jit.script(candidate)
        with torch.no_grad():
            assert torch.allclose(scripted(x), fused(x), rtol=1e-6, atol=1e-7)
    assert "_modules[" in fused.code  # scripting left the rewritten module as it was


class _KeywordNames(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({"for": nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))})

    def forward(self, x):
        return self.blocks["for"](x)


def test_a_submodule_named_by_a_python_keyword_is_rewritten_where_torch_fx_can_write_it():
    model = _KeywordNames()
    models.randomize_batchnorm(model, 2)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    from normfx.passes.fx.codegen import unwritable_target

    assert unwritable_target(fx.Tracer().trace(model)) == "its submodule name 'blocks.for.0' holds the Python keyword 'for'"
    fused = normfx.rewrite(model, "fuse", example_inputs=x)
    assert not isinstance(fused, fx.GraphModule) and isinstance(fused.blocks["for"], fx.GraphModule)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())  # the inner part was traced and fused
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    with torch.no_grad():
        assert rel_error(model(x), torch.load(buffer, weights_only=False)(x)) <= 1e-5
