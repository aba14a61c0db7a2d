"""normfx.export and the agreement of the two routes:
``export(rewrite_fx(m))`` ≈ ``rewrite_onnx(export(m))`` ≈ ``m(x)`` on every zoo model."""

import numpy as np
import onnx
import pytest
import torch
from helpers import fp32_tolerance

import normfx
from normfx import models
from normfx.errors import InputDataError, VerificationError
from normfx.export import export_onnx

# Models where the fx route leaves no BN (ConvTranspose ones included, which ORT's optimizer and
# onnxoptimizer do not fold).
NO_BN_LEFT = [
    "resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "unet", "conv1d", "conv3d", "mlp",
    "trap_bn_act", "trap_functional_bn", "trap_shared_conv", "trap_shared_bn", "trap_syncbn",
]


def batchnorm_nodes(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.op_type == "BatchNormalization")


def run_ort(model: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    from normfx.runtime import make_session

    session = make_session(model, optimization="disable")
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def rel(reference: np.ndarray, candidate: np.ndarray) -> float:
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    return float(np.abs(reference - candidate).max() / np.abs(reference).max())


@pytest.mark.parametrize("name", models.names())
def test_fx_route_and_onnx_route_agree(name):
    model = models.create(name, seed=3)
    x = models.example_input(name, batch=2, seed=3)
    with torch.no_grad():
        y = model(x).numpy()

    fx_route = normfx.export(model, x, None)  # rewrite_fx → torch.onnx → ONNX passes → ORT check
    plain = export_onnx(model, (x,))  # the exporter with constant folding off keeps every BN
    onnx_route, report = normfx.rewrite_with_report(plain, "fuse")

    assert fx_route.verification.ok
    y_fx, y_onnx = run_ort(fx_route.model, x), run_ort(onnx_route, x)
    tol = fp32_tolerance(model, x)  # 1e-5 but on fp32_noise models
    assert rel(y, y_fx) <= tol
    assert rel(y, y_onnx) <= tol
    assert rel(y_fx, y_onnx) <= tol
    onnx.checker.check_model(onnx_route, full_check=True)
    assert batchnorm_nodes(onnx_route) == len(report.skipped)
    if name in NO_BN_LEFT:
        assert batchnorm_nodes(plain) > 0  # the test graph really had BN to fold
        assert fx_route.batchnorm_left == 0
        assert batchnorm_nodes(onnx_route) == 0


def test_border_correction_folds_bn_before_padded_convs_on_both_routes():
    model = models.create("bn_conv")
    x = models.example_input("bn_conv", batch=2)
    y = model(x).detach().numpy()
    fx_route = normfx.export(model, x, None, policy="fuse:border_correction=true", dynamic_batch=False)
    plain = export_onnx(model, (x,), dynamic_batch=False)
    default = normfx.explain(plain, "fuse")
    assert default.skipped and all("border_correction=true" in e.reason or "Relu" in e.reason for e in default.skipped)
    onnx_route = normfx.rewrite(plain, "fuse:border_correction=true")
    assert fx_route.batchnorm_left == 0 and batchnorm_nodes(onnx_route) == 0
    assert rel(y, run_ort(fx_route.model, x)) <= 1e-5 and rel(y, run_ort(onnx_route, x)) <= 1e-5


def test_export_writes_atomically_and_checks_another_batch(tmp_path):
    model = models.create("unet")
    x = models.example_input("unet", batch=1)
    path = tmp_path / "unet.onnx"
    result = normfx.export(model, x, path, policy="fuse", opset=17)
    assert path.is_file() and result.batchnorm_left == 0
    assert result.extra_checks and result.extra_checks[0].ok and result.extra_checks[0].outputs[0].shape[0] == 2
    written = onnx.load(str(path))
    assert written.opset_import[0].version == 17
    assert written.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [p.name for p in tmp_path.iterdir()] == ["unet.onnx"]  # no temp files left behind


def test_failed_verification_writes_nothing(tmp_path):
    model = models.create("resnet18")
    x = models.example_input("resnet18")
    path = tmp_path / "out.onnx"
    with pytest.raises(VerificationError, match="nothing was written"):
        normfx.export(model, x, path, rtol=0.0, atol=0.0)  # fp32 rounding alone fails a zero tolerance
    assert not list(tmp_path.iterdir())


def test_export_refuses_to_overwrite_its_input(tmp_path):
    plain = export_onnx(models.create("conv1d"), (models.example_input("conv1d"),))
    path = tmp_path / "model.onnx"
    path.write_bytes(plain.SerializeToString())
    before = path.read_bytes()
    with pytest.raises(InputDataError, match="is the input file"):
        normfx.export(str(path), None, path)
    assert path.read_bytes() == before


def test_export_of_an_onnx_file_folds_and_verifies(tmp_path):
    plain = export_onnx(models.create("unet"), (models.example_input("unet"),))
    source = tmp_path / "plain.onnx"
    source.write_bytes(plain.SerializeToString())
    result = normfx.export(str(source), None, tmp_path / "fused.onnx")
    assert result.verification.ok and result.batchnorm_left == 0
    assert result.onnx_report.applied


def test_assert_equivalent_across_kinds():
    model = models.create("mlp")
    x = models.example_input("mlp", batch=4)
    fused = normfx.export(model, x, None).model
    result = normfx.testing.assert_equivalent(model, fused, x, rtol=1e-5)
    assert result.ok
    with pytest.raises(AssertionError, match="max rel error"):
        normfx.testing.assert_equivalent(model, models.create("mlp", seed=1), x)


def test_export_refuses_a_model_in_training_mode(tmp_path):
    model = models.create("resnet18").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(normfx.errors.ModelError, match="call model.eval"):
        normfx.export(model, models.example_input("resnet18", batch=2), tmp_path / "m.onnx")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not list(tmp_path.iterdir())
