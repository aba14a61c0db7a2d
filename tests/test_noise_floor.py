"""Noise-aware verification: float64 references, measured noise floors, and the tolerance they give.

The zoo's ``deep_silu`` is ill-conditioned in float32 on purpose (tag ``fp32_noise``): a fixed 1e-5 between
two float32 runs fails its exact fold, the float64 judgement passes it, and a wrong fold still fails.
"""

import json

import numpy as np
import onnx
import pytest
import torch

import normfx
from normfx import models
from normfx.errors import VerificationError
from normfx.export import export_onnx
from normfx.noise import DEFAULT_RTOL, K_FLOOR, K_PLAIN_EXPORT, measure_baseline, onnx_to_float64, relative_errors
from normfx.verify import as_runner, judge

NOISY = [name for name in models.names() if "fp32_noise" in models.info(name).tags]


def _floor(model, x) -> float:
    run = as_runner(model)[0]
    return max(measure_baseline(model, run, [x.numpy()]).floors)


def test_the_zoo_has_a_model_whose_fp32_noise_exceeds_1e5():
    assert "deep_silu" in NOISY
    for name in NOISY:
        assert _floor(models.create(name), models.example_input(name)) > 1e-5


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet18", "mlp"])
def test_small_models_keep_the_strict_default(name):
    model = models.create(name)
    x = models.example_input(name, batch=2)
    fused = normfx.rewrite(model, "fuse", example_inputs=x)
    result = normfx.verify(model, fused, x)
    assert result.noise_floor < 1e-6 and result.versus == "float64"
    assert result.tolerance == DEFAULT_RTOL and result.ok
    assert result.max_rel_error < 1e-6


def test_export_passes_the_deep_silu_model_against_float64():
    model = models.create("deep_silu")
    x = models.example_input("deep_silu")
    with pytest.raises(VerificationError, match="rtol=1e-05"):  # the old fixed tolerance: a false failure
        normfx.export(model, x, None, rtol=1e-5)

    result = normfx.export(model, x, None)
    assert result.batchnorm_left == 0
    for check in [result.verification, *result.extra_checks]:
        assert check.ok and check.versus == "float64" and check.noise_floor_method == "torch float64 copy"
        assert check.noise_floor > 1e-5
        assert DEFAULT_RTOL < check.max_rel_error <= check.tolerance
        expected = max(DEFAULT_RTOL, K_FLOOR * check.noise_floor)
        if check.plain_export_floor is not None:
            expected = max(expected, K_PLAIN_EXPORT * check.plain_export_floor)
        assert check.tolerance == pytest.approx(expected)
    payload = result.to_dict()["verification"]
    assert {"noise_floor", "noise_floor_method", "tolerance", "max_rel_error", "versus", "k"} <= set(payload)
    assert "noise floor" in str(result.verification) and "tolerance" in str(result.verification)


def test_verify_and_assert_equivalent_on_the_deep_model():
    model = models.create("deep_silu")
    x = models.example_input("deep_silu", batch=2)
    fused = normfx.rewrite(model, "fuse", example_inputs=x)
    default = normfx.verify(model, fused, x)
    assert default.ok and default.noise_floor > 1e-5 and default.max_rel_error <= default.tolerance
    strict = normfx.verify(model, fused, x, rtol=1e-5)  # an explicit rtol means exactly that
    assert not strict.ok and strict.noise_floor is None and strict.tolerance == 1e-5
    normfx.testing.assert_equivalent(model, fused, x)
    with pytest.raises(AssertionError, match="noise floor"):
        normfx.testing.assert_equivalent(model, models.create("deep_silu", seed=1), x)


def test_onnx_to_onnx_floor_from_the_float64_graph():
    model = models.create("deep_silu")
    x = models.example_input("deep_silu")
    plain = export_onnx(model, (x,))
    double = onnx_to_float64(plain)
    assert all(t.data_type != onnx.TensorProto.FLOAT for t in double.graph.initializer)
    with torch.no_grad():
        y64 = model.double()(x.double()).numpy()
    from onnx.reference import ReferenceEvaluator

    y_graph = ReferenceEvaluator(double).run(None, {"input": x.double().numpy()})[0]
    assert relative_errors([y64], [y_graph])[0] < 1e-9  # float64 function (its own float64 noise: ~1e-12)

    fused = normfx.export(plain, x.numpy(), None).model
    result = normfx.verify(plain, fused, x.numpy())
    assert result.noise_floor_method == "onnx float64 (reference evaluator)" and result.versus == "float64"
    assert result.noise_floor > 1e-5 and result.ok and result.max_rel_error <= result.tolerance


def test_onnx_floor_on_a_larger_batch_uses_a_sample_and_k_plus_one():
    model = models.create("resnet18")
    x = models.example_input("resnet18", batch=3)
    plain = export_onnx(model, (x,))
    fused = normfx.export(model, x, None).model
    result = normfx.verify(plain, fused, x.numpy())
    assert result.versus == "float32 reference" and result.k == K_FLOOR + 1
    assert "first 1 sample" in result.noise_floor_method and result.ok and result.tolerance == DEFAULT_RTOL


class _ForcesFloat32(torch.nn.Module):
    """Casts its input to float32 inside: a float64 copy cannot run it in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x.float() + torch.ones(8, dtype=torch.float32))


def test_perturbation_floor_where_no_float64_run_exists():
    torch.manual_seed(0)
    model = _ForcesFloat32().eval()
    x = torch.randn(4, 8)
    result = normfx.verify(model, model, x)
    assert result.noise_floor_method.startswith("input perturbation") and "float64 copy did not run" in result.noise_floor_method
    assert result.versus == "float32 reference" and result.k == K_FLOOR + 1 and result.ok
    assert 0 <= result.noise_floor < 1e-6

    def plain_function(a):
        return np.tanh(a) * 3

    other = normfx.verify(plain_function, plain_function, x)
    assert other.noise_floor_method == "input perturbation" and other.max_abs_error == 0.0


def test_judge_takes_the_largest_of_the_three_bounds():
    from normfx.noise import Baseline

    reference = [np.array([1.0, -2.0, 4.0])]
    baseline = Baseline(reference, [1e-4], "test", "float64", K_FLOOR)
    candidate = [np.array([1.0, -2.0, 4.0 + 4 * 3e-4])]  # relative error 3e-4
    assert not judge(baseline, candidate).ok  # 3e-4 > 2 x 1e-4
    widened = judge(baseline, candidate, plain_export_floors=[2.5e-4])  # 1.5 x 2.5e-4 = 3.75e-4
    assert widened.ok and widened.tolerance == pytest.approx(3.75e-4)
    assert "plain export" in widened.tolerance_text()
    assert judge(Baseline(reference, [1e-9], "test", "float64", K_FLOOR), [reference[0] + 1e-5]).tolerance == DEFAULT_RTOL


def test_check_command_prints_and_reports_the_three_numbers(tmp_path, capsys):
    from normfx.cli import main

    model = models.create("deep_silu")
    x = models.example_input("deep_silu")
    plain = export_onnx(model, (x,))
    fused = normfx.export(model, x, None).model
    ref_path, cand_path = tmp_path / "plain.onnx", tmp_path / "fused.onnx"
    ref_path.write_bytes(plain.SerializeToString())
    cand_path.write_bytes(fused.SerializeToString())
    np.save(tmp_path / "x.npy", x.numpy())

    assert main(["check", str(ref_path), str(cand_path), "--inputs", str(tmp_path / "x.npy")]) == 0
    line = capsys.readouterr().out
    assert "equivalent" in line and "noise floor" in line and "tolerance" in line and "vs float64" in line

    assert main(["check", str(ref_path), str(cand_path), "--inputs", str(tmp_path / "x.npy"), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["noise_floor"] > 1e-5 and payload["max_rel_error"] <= payload["tolerance"]
    assert payload["noise_floor_method"] == "onnx float64 (reference evaluator)"

    assert main(["check", str(ref_path), str(cand_path), "--inputs", str(tmp_path / "x.npy"), "--rtol", "1e-5"]) == 1
    assert "rtol=1e-05" in capsys.readouterr().out


def test_graphs_too_large_for_the_float64_evaluator_fall_back_to_perturbation(monkeypatch):
    import normfx.noise

    model = models.create("resnet18")
    x = models.example_input("resnet18")
    plain = export_onnx(model, (x,))
    assert 1e6 < normfx.noise.conv_macs(plain) < normfx.noise.EVALUATOR_MAC_BUDGET
    monkeypatch.setattr(normfx.noise, "EVALUATOR_MAC_BUDGET", 1e6)
    result = normfx.verify(plain, plain, x.numpy())
    assert result.noise_floor_method.startswith("input perturbation") and "too large" in result.noise_floor_method
    assert result.versus == "float32 reference" and result.ok and result.max_abs_error == 0.0


class _CastsBackToFloat32(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x).float()


def test_a_float64_copy_that_returns_float32_is_not_taken_for_float64():
    torch.manual_seed(0)
    model = _CastsBackToFloat32().eval()
    result = normfx.verify(model, model, torch.randn(4, 8))
    assert result.noise_floor_method.startswith("input perturbation") and "casts inside" in result.noise_floor_method
    assert result.ok and result.versus == "float32 reference"
