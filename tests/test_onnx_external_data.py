"""ONNX models whose weights live in an external data file: a ModelProto loaded without its external data is
refused with one line naming the tensor and the fix (by unfuse and by the statistics route alike); the path,
or a ModelProto with its data loaded, works."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx_graphs import Builder
from test_onnx_passes import count, ort_run, rel

import normfx
from normfx.errors import ModelError
from normfx.stats import recompute_stats
from normfx.stats.onnx_collect import collect_onnx_moments

FIX = r"pass the \.onnx path, or call onnx\.load_external_data_for_model\(model, folder\) first"


def _model() -> tuple[Builder, onnx.ModelProto]:
    """Conv → BN → Relu → Conv → Relu → Gemm head: layers to unfuse and a BN to recompute."""
    b = Builder(90)
    x = b.input("x", ["N", 3, 6, 6])
    h = b.node("Relu", [b.bn(b.conv(x, 3, 4, 3, name="conv"), 4, name="bn")])
    h = b.node("Relu", [b.conv(h, 4, 4, 1, name="conv2")])
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h])])
    b.output(b.node("Gemm", [h, b.weight("head.w", [2, 4]), b.init("head.b", np.ones(2, np.float32))],
                    name="head", transB=1))
    return b, b.model()


@pytest.fixture()
def saved(tmp_path):
    """The model saved with every tensor in ``weights.bin`` beside it; returns (builder, model, path)."""
    b, model = _model()
    path = tmp_path / "model.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # save_model(save_as_external_data=True) moves the copy's data out
    onnx.save_model(copy, os.fspath(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    assert (tmp_path / "weights.bin").exists()
    return b, model, path


def _data(b: Builder) -> list[np.ndarray]:
    return [b.rng.normal(0.5, 1.3, (4, 3, 6, 6)).astype(np.float32) for _ in range(2)]


def test_unloaded_external_data_is_refused_with_the_fix(saved):
    b, _, path = saved
    unloaded = onnx.load(os.fspath(path), load_external_data=False)
    message = rf"tensor 'conv\.weight' keeps its data in an external file \(file 'weights\.bin'\) that was not loaded; {FIX}"
    for policy, data in (("unfuse", None), ("unfuse", _data(b)), ("precise", _data(b)), ("adaptive", _data(b))):
        with pytest.raises(ModelError, match=message):
            normfx.rewrite(unloaded, policy, data=data)
    with pytest.raises(ModelError, match=FIX):
        normfx.explain(unloaded, "unfuse")
    with pytest.raises(ModelError, match=FIX):
        recompute_stats(unloaded, _data(b), progress=False)
    with pytest.raises(ModelError, match=FIX):
        collect_onnx_moments(unloaded, _data(b), ["bn"], progress=False)


def test_the_path_and_loaded_data_work(saved):
    b, model, path = saved
    feeds = b.feeds(3)
    reference = ort_run(model, feeds)[0]
    data = _data(b)
    unloaded = onnx.load(os.fspath(path), load_external_data=False)
    onnx.load_external_data_for_model(unloaded, os.fspath(path.parent))  # the fix the message gives
    for source in (os.fspath(path), onnx.load(os.fspath(path)), unloaded):
        out, report = normfx.rewrite_with_report(source, "unfuse", data=data)
        onnx.checker.check_model(out, full_check=True)
        assert count(out) - count(model) == len(report.applied) == 1  # conv2 (conv has its BN, head: classifier)
        assert all(e.details["statistics"] == "data" for e in report.applied)
        assert rel(reference, ort_run(out, feeds)[0]) <= 1e-5
        assert all(not t.HasField("data_location") or t.data_location == onnx.TensorProto.DEFAULT
                   for t in out.graph.initializer)
        precise = recompute_stats(source, data, progress=False)
        assert isinstance(precise, onnx.ModelProto) and count(precise) == 1
