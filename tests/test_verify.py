"""normfx.verify on torch modules and ONNX models."""

import copy
import io

import numpy as np
import pytest
import torch

import normfx
from normfx.errors import InputDataError, VerificationError


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh()).eval()


def test_identical_models_are_ok_and_errors_are_measured():
    x = torch.randn(3, 5)
    net = _net(0)
    exact = normfx.verify(net, net, x, rtol=1e-5)  # an explicit rtol compares float32 with float32
    assert exact.ok and exact.max_abs_error == 0.0 and exact.max_rel_error == 0.0 and exact.noise_floor is None
    same = normfx.verify(net, net, x)  # by default against float64: the model's own error is its floor
    assert same.ok and same.versus == "float64" and same.max_rel_error == same.noise_floor < 1e-6
    assert same.tolerance == 1e-5

    other = _net(1)
    result = normfx.verify(net, other, x)
    y0 = copy.deepcopy(net).double()(x.double()).detach()
    y1 = other(x).detach().double()
    expected_abs = float((y0 - y1).abs().max())
    assert result.max_abs_error == pytest.approx(expected_abs, rel=1e-6)
    assert result.max_rel_error == pytest.approx(expected_abs / float(y0.abs().max()), rel=1e-6)
    assert not result.ok
    assert "FAILED" in str(result) and "noise floor" in str(result)
    assert normfx.verify(net, other, x, rtol=0.0, atol=expected_abs * 1.01).ok


def test_nested_outputs_and_shape_mismatch():
    class Two(torch.nn.Module):
        def forward(self, x):
            return {"a": x * 2, "b": (x + 1, x.sum())}

    class Wrong(torch.nn.Module):
        def forward(self, x):
            return {"a": x * 2, "b": (x[:1] + 1, x.sum())}

    x = torch.randn(2, 3)
    result = normfx.verify(Two(), Two(), x)
    assert result.ok and len(result.outputs) == 3
    with pytest.raises(VerificationError, match="shape"):
        normfx.verify(Two(), Wrong(), x)


def test_torch_against_onnxruntime_and_npz_inputs(tmp_path):
    net = _net(0)
    x = torch.randn(2, 5)
    buffer = io.BytesIO()
    torch.onnx.export(net, (x,), buffer, dynamo=False, input_names=["x"], output_names=["y"])
    path = tmp_path / "net.onnx"
    path.write_bytes(buffer.getvalue())
    np.savez(tmp_path / "inputs.npz", x=x.numpy())
    result = normfx.verify(net, str(path), str(tmp_path / "inputs.npz"))
    assert result.ok and result.max_rel_error < 1e-6
    assert result.outputs[0].name == "y"


def test_bad_inputs_raise_one_line_errors(tmp_path):
    net = _net(0)
    with pytest.raises(InputDataError, match="does not exist"):
        normfx.verify(net, net, str(tmp_path / "missing.npz"))
    (tmp_path / "bad.npz").write_bytes(b"not numpy")
    with pytest.raises(InputDataError, match="cannot read inputs"):
        normfx.verify(net, net, str(tmp_path / "bad.npz"))
    with pytest.raises(InputDataError, match="shape"):
        normfx.verify(net, net, torch.randn(2, 7))


def test_verifying_a_train_mode_model_leaves_its_buffers_alone():
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    normfx.verify(model, model, torch.randn(8, 5))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert model.training


def test_npz_inputs_are_fed_by_name(tmp_path):
    from onnx import TensorProto, helper

    def sub(order):  # y = a - b, with the graph inputs declared in the given order
        decl = {n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in "ab"}
        graph = helper.make_graph([helper.make_node("Sub", ["a", "b"], ["y"])], "g", [decl[n] for n in order],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    a, b = np.array([5.0, 1.0], np.float32), np.array([1.0, 2.0], np.float32)
    np.savez(tmp_path / "named.npz", b=b, a=a)  # stored in the other order than either model
    result = normfx.verify(sub("ab"), sub("ba"), str(tmp_path / "named.npz"))
    assert result.ok and result.max_abs_error == 0.0
    np.savez(tmp_path / "wrong.npz", foo=a, bar=b)
    with pytest.raises(InputDataError, match="do not match the model's inputs a, b"):
        normfx.verify(sub("ab"), sub("ab"), str(tmp_path / "wrong.npz"))


def test_an_empty_batch_is_refused_rather_than_passing_with_nothing_compared():
    from normfx.testing import assert_equivalent

    model = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3), torch.nn.BatchNorm1d(2)).eval()
    empty = torch.randn(0, 1, 8)
    with pytest.raises(InputDataError, match="hold no values, so there is nothing to compare"):
        normfx.verify(model, model, empty)
    with pytest.raises(InputDataError, match="hold no values"):
        assert_equivalent(model, model, (empty,))
