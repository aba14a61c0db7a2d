"""A fold that is really wrong still fails verification on every zoo model, noise floor or not.

The wrong fold: the sign of one output channel of one folded conv/linear (weight and bias) flipped, in the
torch model that ``fuse`` returns and in the ONNX model that ``export`` writes. The zoo is read at test
time, so models added to the catalog are covered.
"""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import normfx
from normfx import models
from normfx.export import export_onnx

_AFFINE = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)


def _output_axis(module: torch.nn.Module) -> int:
    return 1 if isinstance(module, torch.nn.modules.conv._ConvTransposeNd) else 0


def _flip_channel(weight: torch.Tensor, bias: torch.Tensor | None, axis: int) -> int:
    """Negate the output channel of ``weight`` (and ``bias``) with the largest weights; returns its index."""
    norms = weight.detach().double().abs().transpose(0, axis).reshape(weight.shape[axis], -1).sum(1)
    channel = int(norms.argmax())
    with torch.no_grad():
        weight.select(axis, channel).neg_()
        if bias is not None:
            bias[channel].neg_()
    return channel


def folded_modules(original: torch.nn.Module, rewritten: torch.nn.Module) -> list[str]:
    """Names of the conv/linear layers of ``rewritten`` whose weights differ from the original's (folded into)."""
    before = dict(original.named_modules())
    names = []
    for name, module in rewritten.named_modules():
        old = before.get(name)
        if isinstance(module, _AFFINE) and isinstance(old, _AFFINE) and module.weight.shape == old.weight.shape:
            if not torch.equal(module.weight, old.weight):
                names.append(name)
    return names


@pytest.mark.parametrize("name", models.names())
def test_a_wrong_fold_fails_torch_verification(name):
    model = models.create(name)
    x = models.example_input(name, batch=2)
    fused = normfx.rewrite(model, "fuse", example_inputs=x)
    folded = folded_modules(model, fused)
    assert folded, f"{name}: fuse folded nothing into a conv/linear"

    right = normfx.verify(model, fused, x)
    assert right.ok and right.max_rel_error <= right.tolerance

    layer = dict(fused.named_modules())[folded[0]]
    _flip_channel(layer.weight, layer.bias, _output_axis(layer))
    wrong = normfx.verify(model, fused, x)
    assert not wrong.ok
    assert wrong.max_rel_error > wrong.tolerance >= 1e-5
    assert wrong.noise_floor is not None and wrong.versus == "float64"


def _flip_onnx_channel(model: onnx.ModelProto, plain: onnx.ModelProto) -> str:
    """Flip one output channel of a weight the fold changed (same name as in ``plain``, other values);
    the first Conv/Gemm/MatMul weight where no name matches. Returns the initializer's name."""
    inits = {t.name: t for t in model.graph.initializer}
    before = {t.name: numpy_helper.to_array(t) for t in plain.graph.initializer}
    chosen = None
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        weight = inits.get(node.input[1])
        if weight is None:
            continue
        array = numpy_helper.to_array(weight)
        old = before.get(weight.name)
        changed = old is not None and (old.shape != array.shape or not np.array_equal(old, array))
        if chosen is None or changed:
            chosen = (node, weight, array)
        if changed:
            break
    assert chosen is not None, "no weight to flip"
    node, weight, array = chosen
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    axis = {"Conv": 0, "ConvTranspose": 1, "MatMul": array.ndim - 1}.get(node.op_type)
    if node.op_type == "Gemm":
        axis = 0 if attrs.get("transB", 0) else 1
    flipped = np.array(array, copy=True)
    index = [slice(None)] * flipped.ndim
    index[axis] = int(np.abs(np.moveaxis(flipped, axis, 0)).reshape(flipped.shape[axis], -1).sum(1).argmax())
    flipped[tuple(index)] *= -1
    weight.CopyFrom(numpy_helper.from_array(flipped.astype(array.dtype), weight.name))
    return weight.name


@pytest.mark.parametrize("name", models.names())
def test_a_wrong_fold_fails_onnx_verification(name):
    model = models.create(name)
    x = models.example_input(name, batch=1)
    exported = normfx.export(model, x, None)
    assert exported.verification.ok and exported.verification.noise_floor is not None
    plain = export_onnx(model, (x,))
    wrong = onnx.ModelProto()
    wrong.CopyFrom(exported.model)
    _flip_onnx_channel(wrong, plain)

    against_torch = normfx.verify(model, wrong, x)  # float64 copy of the torch model
    assert not against_torch.ok and against_torch.max_rel_error > against_torch.tolerance

    against_onnx = normfx.verify(plain, wrong, x.numpy())  # ONNX → ONNX: floor estimated without torch
    assert not against_onnx.ok and against_onnx.max_rel_error > against_onnx.tolerance
    assert against_onnx.noise_floor_method.startswith(("onnx float64", "input perturbation"))
