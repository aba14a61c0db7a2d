"""Precise / adaptive BN statistics on ONNX models: the ONNX route against the torch route on zoo exports
(BN kept: TorchScript exporter, constant folding off), against float64 numpy on hand-built graphs, the
policies through ``normfx.rewrite`` / ``explain``, the EMA diagnosis, what happens to initializers, and
typed errors for what cannot be done.

Measured (this machine, ORT 1.31 CPU): the ONNX route's statistics agree with the torch route's to a
relative error (max|Δ| / max|ref| per BN) of at most 3.3e-6 (mobilenet_v2 variances; 1e-7..2e-6
elsewhere), and the adapted ONNX model's ORT output agrees with the torch adapted model's to at most
2.9e-6. Both routes reduce the activations with the same float64 code; the difference is float32
rounding of the forward (ORT's conv vs torch's, the batch-statistics BN decomposition vs torch's BN)
amplified through depth. Tolerances: 2e-5 for statistics, 1e-5 for outputs.
"""

from __future__ import annotations

import textwrap

import numpy as np
import onnx
import pytest
import torch
from helpers import run_gloo_ranks
from onnx import TensorProto, helper, numpy_helper
from onnx_graphs import Builder

import normfx
from normfx import models
from normfx.errors import InputDataError, ModelError
from normfx.export import export_onnx
from normfx.passes.onnx.io import onnx_batchnorm_names
from normfx.runtime import make_session
from normfx.stats import diagnose_ema, recompute_stats, recompute_stats_with_report, recompute_with_diagnosis
from normfx.stats.moments import merge
from normfx.stats.onnx_collect import collect_onnx_moments

STATS_TOL = 2e-5
OUT_TOL = 1e-5
BN = "BatchNormalization"


def rel(reference, candidate) -> float:
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    return float(np.abs(reference - candidate).max() / max(np.abs(reference).max(), 1e-30))


def run_ort(model, feeds: dict) -> list[np.ndarray]:
    session = make_session(model, optimization="disable")
    return session.run(None, feeds)


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def bn_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == BN]


def batches_for(name: str, sizes=(6, 5, 6), seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((n, *models.info(name).input_shape), generator=g) * 1.5 + 0.5 for n in sizes]


def check_model_kept(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """Checker + strict shape inference pass; model fields, graph I/O and untouched initializers kept."""
    onnx.checker.check_model(after, full_check=True)
    onnx.shape_inference.infer_shapes(after, strict_mode=True, check_type=True)
    assert after.ir_version == before.ir_version
    assert list(after.opset_import) == list(before.opset_import)
    assert list(after.metadata_props) == list(before.metadata_props)
    assert [i.name for i in after.graph.input] == [i.name for i in before.graph.input]
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
    stats = {n for node in bn_nodes(before) for n in node.input[3:5]}
    old = {t.name: t.SerializeToString() for t in before.graph.initializer if t.name not in stats}
    new = {t.name: t.SerializeToString() for t in after.graph.initializer}
    for name, data in old.items():
        assert new[name] == data, f"initializer {name} changed"


@pytest.fixture(scope="module")
def exported():
    """Zoo models (randomized BN) and their unfused exports, cached per module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model = models.create(name, seed=2)
            proto = export_onnx(model, (models.example_input(name, batch=2),))
            cache[name] = (model, proto)
        return cache[name]

    return get


# --- the two routes agree ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mlp", "conv1d", "preact_resnet"])
def test_onnx_route_agrees_with_torch_route(name, exported):
    model, proto = exported(name)
    before = proto.SerializeToString()
    batches = batches_for(name)
    torch_out = recompute_stats(model, batches, progress=False)
    onnx_out, report = recompute_stats_with_report(proto, batches, progress=False)
    assert proto.SerializeToString() == before, "the caller's ModelProto changed"
    assert isinstance(onnx_out, onnx.ModelProto)
    check_model_kept(proto, onnx_out)

    values, modules = inits(onnx_out), dict(torch_out.named_modules())
    nodes = bn_nodes(onnx_out)
    assert len(report.applied) == len(nodes) == len(onnx_batchnorm_names(proto)) > 0 and not report.skipped
    for node in nodes:
        bn = modules[node.input[1].rsplit(".", 1)[0]]  # the export names BN parameters after the module
        assert node.input[3:5] == [f"{node.input[1].rsplit('.', 1)[0]}.running_{k}" for k in ("mean", "var")]
        assert rel(bn.running_mean.numpy(), values[node.input[3]]) <= STATS_TOL, node.name
        assert rel(bn.running_var.numpy(), values[node.input[4]]) <= STATS_TOL, node.name
        assert values[node.input[4]].dtype == np.float32
    entry = report.applied[0]
    assert entry.rule == "precise" and entry.details["calls"] == 3 and entry.details["batches"] == 3
    assert entry.reason.startswith("precise statistics over ") and "from 3 call(s) in 3 batch(es)" in entry.reason

    x = models.example_input(name, batch=4, seed=5)
    with torch.no_grad():
        y_torch = torch_out(x).numpy()
    (y_onnx,) = run_ort(onnx_out, {"input": x.numpy()})
    assert rel(y_torch, y_onnx) <= OUT_TOL


def test_path_input_file_untouched_and_policies_agree(exported, tmp_path):
    _, proto = exported("conv1d")
    path = tmp_path / "conv1d.onnx"
    path.write_bytes(proto.SerializeToString())
    before = path.read_bytes()
    batches = batches_for("conv1d")
    direct = recompute_stats(str(path), batches, progress=False, mode="adaptive")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["conv1d.onnx"]
    via_policy, report = normfx.rewrite_with_report(path, "adaptive", data=batches)
    assert [e.rule for e in report.applied] == ["adaptive"] * 5
    a, b = inits(direct), inits(via_policy)
    assert a.keys() == b.keys()
    for key in a:
        assert rel(a[key], b[key]) <= 1e-6 if a[key].size else True
    # data forms: tuples (inputs, *targets), dicts by input name, float64 numpy arrays (cast to float32)
    forms = [
        [(x, torch.zeros(len(x))) for x in batches],
        [{"input": x.numpy().astype(np.float64)} for x in batches],
    ]
    for data in forms:
        other = inits(recompute_stats(proto, data, progress=False))
        for key in a:
            assert rel(a[key], other[key]) <= 1e-6 if a[key].size else True
    one = normfx.rewrite(proto, "precise:num_batches=1", data=batches)
    first = normfx.rewrite(proto, "precise", data=batches[:1])
    assert all(np.array_equal(v, inits(first)[k]) for k, v in inits(one).items())


def test_shared_statistics_initializers_are_copied(exported):
    """trap_shared_bn: one torch BN called twice exports as two nodes reading the same initializers.
    Each node gets its own statistics in new initializers where another node still reads the old ones;
    merged, the two nodes' moments are the torch route's statistics of the shared module."""
    model, proto = exported("trap_shared_bn")
    batches = batches_for("trap_shared_bn")
    out, report = recompute_stats_with_report(proto, batches, progress=False)
    check_model_kept(proto, out)
    shared = [n for n in bn_nodes(out) if n.input[1] == "bn.weight"]
    assert len(shared) == 2 and len(report.applied) == 3
    means, variances = {n.input[3] for n in shared}, {n.input[4] for n in shared}
    assert len(means) == 2 and len(variances) == 2, "the shared initializers must be split"
    assert "bn.running_mean" in means and "bn.running_var" in variances  # the last reader keeps the original
    assert {n.input[1] for n in shared} == {"bn.weight"} and {n.input[2] for n in shared} == {"bn.bias"}
    assert len(out.graph.initializer) == len(proto.graph.initializer) + 2
    values = inits(out)
    assert not np.array_equal(values[shared[0].input[3]], values[shared[1].input[3]])

    torch_out = recompute_stats(model, batches, progress=False)
    collected = collect_onnx_moments(proto, batches, onnx_batchnorm_names(proto), progress=False)
    merged = merge([collected.layers[n.name].moments for n in shared])
    assert rel(torch_out.bn.running_mean.numpy(), merged.mean.numpy()) <= STATS_TOL
    assert rel(torch_out.bn.running_var.numpy(), merged.var_unbiased.numpy()) <= STATS_TOL
    for node in shared:  # each node holds its own input's statistics
        m = collected.layers[node.name].moments
        assert rel(m.mean.numpy(), values[node.input[3]]) <= 1e-6
        assert rel(m.var_unbiased.numpy(), values[node.input[4]]) <= 1e-6
    stem = next(n for n in bn_nodes(out) if n.input[1] == "stem.1.weight")
    assert stem.input[3] == "stem.1.running_mean"  # an initializer only its node reads: replaced in place
    assert rel(torch_out.stem[1].running_mean.numpy(), values[stem.input[3]]) <= STATS_TOL


# --- hand-built graphs: numbers against float64 numpy --------------------------------------------


def two_bn_graph(opset: int = 15, ir_version: int = 8, dtype=np.float32, seed: int = 0):
    """x → BN a → BN b → y (x: [N, 3, 5]); BN b's input is BN a's output."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rng = np.random.default_rng(seed)
    params = {}
    nodes, initializers = [], []
    for bn, src, dst in (("a", "x", "h"), ("b", "h", "y")):
        p = {"scale": rng.uniform(0.5, 1.5, 3) * np.array([-1, 1, 1]), "B": rng.normal(0.5, 0.5, 3),
             "mean": rng.normal(0.3, 0.5, 3), "var": rng.uniform(0.5, 2.0, 3)}
        params[bn] = p
        initializers += [numpy_helper.from_array(v.astype(dtype), f"{bn}.{k}") for k, v in p.items()]
        nodes.append(helper.make_node(BN, [src] + [f"{bn}.{k}" for k in p], [dst], name=f"bn_{bn}", epsilon=1e-3))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, ["N", 3, 5])],
                              [helper.make_tensor_value_info("y", elem, ["N", 3, 5])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    if ir_version < 4:
        model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in initializers)
    return model, params


def reference_two_bn(params, batches, batch_statistics: bool, eps: float = 1e-3):
    """float64 population mean / unbiased var of both BN inputs, BN a on batch or stored statistics."""
    def stats(xs):
        flat = np.concatenate([x.transpose(1, 0, 2).reshape(3, -1) for x in xs], axis=1)
        return flat.mean(1), flat.var(1, ddof=1)

    a = params["a"]
    hs = []
    for x in batches:
        x = x.astype(np.float64)
        if batch_statistics:
            mu, var = x.mean((0, 2), keepdims=True), x.var((0, 2), keepdims=True)
        else:
            mu, var = a["mean"].reshape(1, 3, 1), a["var"].reshape(1, 3, 1)
        hs.append((x - mu) / np.sqrt(var + eps) * a["scale"].reshape(1, 3, 1) + a["B"].reshape(1, 3, 1))
    return {"bn_a": stats(batches), "bn_b": stats(hs)}


def data_for_graph(seed=3, sizes=(4, 7, 5)):
    rng = np.random.default_rng(seed)
    return [(rng.normal(0, 1.7, (n, 3, 5)) + np.array([2.0, -1.0, 0.5]).reshape(1, 3, 1)).astype(np.float32)
            for n in sizes]


@pytest.mark.parametrize("opset, ir_version", [(7, 3), (9, 4), (13, 7), (15, 8), (18, 8)])
def test_batch_statistics_decomposition_against_float64(opset, ir_version):
    """ReduceMean axes as attribute (< 18) and as input (18), no CastLike before 15, IR 3 initializers."""
    model, params = two_bn_graph(opset, ir_version)
    data = data_for_graph()
    ref = reference_two_bn(params, data, batch_statistics=True)
    out, report = recompute_stats_with_report(model, data, progress=False)
    check_model_kept(model, out)
    values = inits(out)
    for node in bn_nodes(out):
        mean, var = ref[node.name]
        assert rel(mean, values[node.input[3]]) <= 1e-6 and rel(var, values[node.input[4]]) <= 1e-6, node.name
        assert report.applied_to(node.name)
    measured = collect_onnx_moments(model, data, ["bn_b", "bn_a"], batch_statistics=False, progress=False)
    ref_eval = reference_two_bn(params, data, batch_statistics=False)
    assert list(measured.layers) == ["bn_b", "bn_a"] and measured.batches == 3
    for name, s in measured.layers.items():
        assert s.calls == s.batches == 3 and s.moments.count == 16 * 5
        assert rel(ref_eval[name][0], s.moments.mean.numpy()) <= 1e-6
        assert rel(ref_eval[name][1], s.moments.var_unbiased.numpy()) <= 1e-6


def test_measuring_only_adds_up_batches_of_one_sample():
    """Measuring only (batch_statistics=False, what unfuse does) counts add up across batches: a batch of
    one sample is fine even where a BN on (N, C) gets one value per channel; on batch statistics it is an error."""
    rng = np.random.default_rng(7)
    stats = {"scale": rng.uniform(0.5, 1.5, 3), "B": rng.normal(0, 1, 3), "mean": rng.normal(0, 1, 3),
             "var": rng.uniform(0.5, 2, 3)}
    graph = helper.make_graph(
        [helper.make_node(BN, ["x"] + [f"bn.{k}" for k in stats], ["y"], name="bn")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(v.astype(np.float32), f"bn.{k}") for k, v in stats.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    data = [rng.normal(1.0, 2.0, (1, 3)).astype(np.float32) for _ in range(4)]
    seen = []
    measured = collect_onnx_moments(model, iter(data), ["bn"], batch_statistics=False, progress=False,
                                    on_batch=lambda i, feed, inputs: seen.append((i, feed["x"].shape, inputs["bn"].shape)))
    moments = measured.layers["bn"].moments
    flat = np.concatenate(data).astype(np.float64)
    assert moments.count == 4 and measured.batches == 4
    assert rel(flat.mean(0), moments.mean.numpy()) <= 1e-6 and rel(flat.var(0, ddof=1), moments.var_unbiased.numpy()) <= 1e-6
    assert seen == [(i, (1, 3), (1, 3)) for i in range(4)]
    single = collect_onnx_moments(model, data[:1], ["bn"], batch_statistics=False, progress=False)
    assert single.layers["bn"].moments.count == 1  # the caller decides (unfuse keeps identity statistics)
    with pytest.raises(InputDataError, match=r"^batch 0 .*gets 1 value per channel .*at least 2"):
        collect_onnx_moments(model, data, ["bn"], batch_statistics=True, progress=False)


def test_float16_model_normalizes_in_float32_and_stores_float16():
    model, params = two_bn_graph(15, 8, dtype=np.float16)
    data = data_for_graph()
    out = recompute_stats(model, data, progress=False)
    onnx.checker.check_model(out, full_check=True)
    values = inits(out)
    params16 = {bn: {k: v.astype(np.float16).astype(np.float64) for k, v in p.items()} for bn, p in params.items()}
    ref = reference_two_bn(params16, [x.astype(np.float16) for x in data], batch_statistics=True)
    for node in bn_nodes(out):
        assert values[node.input[3]].dtype == np.float16
        assert rel(ref[node.name][0], values[node.input[3]]) <= 2e-3
        assert rel(ref[node.name][1], values[node.input[4]]) <= 2e-3


def test_constant_node_and_constant_subgraph_statistics_get_new_initializers():
    model, params = two_bn_graph()
    graph = model.graph
    keep = [t for t in graph.initializer if t.name not in ("a.mean", "a.var")]
    a_mean = next(t for t in graph.initializer if t.name == "a.mean")
    graph.ClearField("initializer")
    graph.initializer.extend(keep + [numpy_helper.from_array(params["a"]["var"].astype(np.float32), "a.var.raw")])
    pre = [helper.make_node("Constant", [], ["a.mean"], name="mean_const", value=a_mean),
           helper.make_node("Identity", ["a.var.raw"], ["a.var"], name="var_identity")]
    nodes = pre + list(graph.node)
    graph.ClearField("node")
    graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    data = data_for_graph()
    out = recompute_stats(model, data, progress=False)
    onnx.checker.check_model(out, full_check=True)
    assert [n.name for n in out.graph.node] == ["bn_a", "bn_b"]  # the constants nothing reads are gone
    assert "a.var.raw" not in inits(out)
    node = bn_nodes(out)[0]
    ref = reference_two_bn(params, data, batch_statistics=True)["bn_a"]
    assert rel(ref[0], inits(out)[node.input[3]]) <= 1e-6 and rel(ref[1], inits(out)[node.input[4]]) <= 1e-6


# --- policies, overrides, explain, diagnosis ---------------------------------------------------------


def test_override_keep_and_explain(exported):
    _, proto = exported("resnet18")
    names = onnx_batchnorm_names(proto)
    batches = batches_for("resnet18", sizes=(4, 4))
    policy = {"/layer1/*": "keep", "*": "adaptive"}
    out, report = normfx.rewrite_with_report(proto, policy, data=batches)
    layer1 = [n for n in names if n.startswith("/layer1/")]
    assert len(layer1) == 4
    assert {e.name for e in report.kept} == set(layer1) and {e.rule for e in report.kept} == {"keep"}
    assert {e.name for e in report.applied} == set(names) - set(layer1)
    before, after = inits(proto), inits(out)
    for node in bn_nodes(out):
        changed = not np.array_equal(before[node.input[3]], after[node.input[3]])
        assert changed == (node.name not in layer1), node.name

    dry = normfx.explain(proto, policy)
    would = [e for e in dry.entries if e.status == "applied"]
    assert [e.name for e in would] == [e.name for e in report.applied]
    assert all(e.reason == "would recompute adaptive statistics from data (needs data=: an iterable of batches)"
               for e in would)
    assert {e.name for e in dry.kept} == set(layer1)
    with_data = normfx.explain(proto, "precise", data=batches)
    assert {e.reason for e in with_data.entries} == {"would recompute precise statistics from data"}
    with pytest.raises(InputDataError, match="needs data"):
        normfx.rewrite(proto, "precise")


def test_diagnose_ema_matches_the_torch_route(exported, tmp_path):
    model, proto = exported("conv1d")
    batches = batches_for("conv1d")
    torch_diag = diagnose_ema(model, batches, progress=False)
    onnx_diag = diagnose_ema(proto, batches, progress=False, plot=tmp_path / "drift.png")
    assert (tmp_path / "drift.png").read_bytes()[:4] == b"\x89PNG"
    assert len(onnx_diag.rows) == len(torch_diag.rows) == 5
    for t, o in zip(torch_diag.rows, onnx_diag.rows):
        assert o.layer.endswith("/BatchNormalization") and o.calls == t.calls == 3 and o.count == t.count
        for key in ("mean_shift_mean", "mean_shift_max", "var_ratio_mean", "var_ratio_min", "var_ratio_max"):
            assert abs(getattr(o, key) - getattr(t, key)) <= 1e-4 * max(1.0, abs(getattr(t, key))), (o.layer, key)
    run = recompute_with_diagnosis(proto, batches, progress=False, mode="adaptive")
    assert isinstance(run.model, onnx.ModelProto) and run.diagnosis.mode == "adaptive"
    assert len(run.report.applied) == 5


def test_training_mode_node_is_skipped_and_reported():
    b = Builder(0, opset=15)
    h = b.bn(b.input("x", ["N", 3, 5, 5]), 3, name="bn_eval")
    stats = [b.init(f"t.{k}", v) for k, v in
             {"s": np.ones(3, np.float32), "b": np.zeros(3, np.float32), "m": np.zeros(3, np.float32),
              "v": np.ones(3, np.float32)}.items()]
    y = b.node(BN, [h, *stats], n_out=3, name="bn_train", training_mode=1)
    b.output(y[0], ["N", 3, 5, 5])
    model = b.model()
    data = [np.random.default_rng(0).normal(size=(4, 3, 5, 5)).astype(np.float32)]
    out, report = recompute_stats_with_report(model, data, progress=False)
    assert [e.name for e in report.applied] == ["bn_eval"]
    (skipped,) = report.skipped
    assert skipped.name == "bn_train" and "training_mode=1" in skipped.reason
    assert inits(out)["t.m"].tolist() == [0, 0, 0]


# --- errors ---------------------------------------------------------------------------------------------


def subgraph_model() -> onnx.ModelProto:
    """x → BN main → If(cond) { then: BN inner on the outer tensor; else: Identity } → y."""
    b = Builder(0, opset=15)
    h = b.bn(b.input("x", ["N", 3, 4, 4]), 3, name="bn_main")
    inner = Builder(1, opset=15)
    z = inner.bn(h, 3, name="bn_inner", out="inner_y")
    then_graph = helper.make_graph(inner.nodes, "then", [], [helper.make_tensor_value_info(z, TensorProto.FLOAT, None)],
                                   inner.inits)
    else_graph = helper.make_graph([helper.make_node("Identity", [h], ["e"])], "else", [],
                                   [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    cond = b.init("cond", np.array(True))
    y = b.node("If", [cond], name="branch", then_branch=then_graph, else_branch=else_graph)
    b.output(y, ["N", 3, 4, 4])
    return b.model()


def test_bn_in_a_subgraph_raises_and_an_override_excludes_it():
    model = subgraph_model()
    onnx.checker.check_model(model, full_check=True)
    data = [np.random.default_rng(0).normal(size=(4, 3, 4, 4)).astype(np.float32)]
    with pytest.raises(ModelError, match=r"'bn_inner' is inside the 'then_branch' subgraph of If node 'branch'.*override"):
        recompute_stats(model, data, progress=False)
    with pytest.raises(ModelError, match="'bn_inner': 'keep', '\\*': 'adaptive'"):
        normfx.rewrite(model, "adaptive", data=data)
    with pytest.raises(ModelError, match="bn_inner"):
        collect_onnx_moments(model, data, ["bn_inner"], progress=False)
    out, report = normfx.rewrite_with_report(model, {"bn_inner": "keep", "*": "adaptive"}, data=data)
    assert [e.name for e in report.applied] == ["bn_main"] and [e.name for e in report.kept] == ["bn_inner"]
    onnx.checker.check_model(out, full_check=True)


def test_bn_in_a_local_function_raises():
    model, _ = two_bn_graph()
    function = helper.make_function(
        "local", "NormFn", ["x", "s", "b", "m", "v"], ["y"],
        [helper.make_node(BN, ["x", "s", "b", "m", "v"], ["y"], name="fn_bn")],
        opset_imports=[helper.make_opsetid("", 15)],
    )
    model.functions.append(function)
    model.opset_import.append(helper.make_opsetid("local", 1))
    y = model.graph.output[0]
    model.graph.node[-1].output[0] = "h2"
    model.graph.node.append(helper.make_node("NormFn", ["h2", "b.scale", "b.B", "b.mean", "b.var"], [y.name],
                                             domain="local", name="call"))
    onnx.checker.check_model(model, full_check=True)
    data = data_for_graph()
    with pytest.raises(ModelError, match="'fn_bn' is inside local function 'local.NormFn'"):
        recompute_stats(model, data, progress=False)
    out, report = normfx.rewrite_with_report(model, {"fn_bn": "keep", "*": "precise"}, data=data)
    assert [e.name for e in report.applied] == ["bn_a", "bn_b"] and [e.name for e in report.kept] == ["fn_bn"]
    onnx.checker.check_model(out, full_check=True)


def test_statistics_that_are_not_constants_raise():
    model, _ = two_bn_graph()
    as_input = onnx.ModelProto()
    as_input.CopyFrom(model)  # a.mean becomes a plain graph input
    kept = [t for t in as_input.graph.initializer if t.name != "a.mean"]
    as_input.graph.ClearField("initializer")
    as_input.graph.initializer.extend(kept)
    as_input.graph.input.append(helper.make_tensor_value_info("a.mean", TensorProto.FLOAT, [3]))
    data = data_for_graph()
    with pytest.raises(ModelError, match=r"'bn_a': its mean input 'a.mean' is a graph input.*'bn_a': 'keep'"):
        recompute_stats(as_input, data, progress=False)
    overridable = onnx.ModelProto()
    overridable.CopyFrom(model)  # IR >= 4: an initializer also listed as an input is a default the caller may override
    overridable.graph.input.append(helper.make_tensor_value_info("b.var", TensorProto.FLOAT, [3]))
    with pytest.raises(ModelError, match="'bn_b': its variance input 'b.var' is a graph input"):
        recompute_stats(overridable, data, progress=False)
    computed = onnx.ModelProto()
    computed.CopyFrom(model)  # a.var = Abs(x-independent) but computed by a node normfx does not evaluate
    for t in computed.graph.initializer:
        if t.name == "a.var":
            t.name = "a.var.src"
    computed.graph.node.insert(0, helper.make_node("Abs", ["a.var.src"], ["a.var"], name="abs"))
    with pytest.raises(ModelError, match="computed at run time by Abs 'abs'"):
        recompute_stats(computed, data, progress=False)
    out = normfx.rewrite(computed, {"bn_a": "keep", "*": "precise"}, data=data)  # the override way out
    assert inits(out)["a.var.src"].tolist() == inits(computed)["a.var.src"].tolist()


def test_bad_data_raises_one_line_input_errors(exported):
    _, proto = exported("resnet18")
    good = batches_for("resnet18", sizes=(2,))[0]
    cases = [
        ([good, torch.zeros(4, 4, 64, 64)], r"^batch 1: input 'input' expects shape \[batch, 3, 64, 64\] but the batch "
                                            r"has shape \[4, 4, 64, 64\]"),
        ([torch.zeros(4, 3, 64)], r"batch 0: input 'input' expects shape \[batch, 3, 64, 64\].*\[4, 3, 64\]"),
        ([{"image": good}], r"batch 0: dict keys 'image' do not match the model's inputs 'input'"),
        ([np.zeros((2, 3, 64, 64), np.int64)], "expects float32 values, got an array of int64"),
        (["text"], "batch 0 is a str"),
        ([], "no batches"),
        (good, "single array"),
    ]
    for data, message in cases:
        with pytest.raises(InputDataError, match=message) as info:
            recompute_stats(proto, data, progress=False)
        assert "\n" not in str(info.value)
    _, mlp = exported("mlp")
    with pytest.raises(InputDataError, match=r"batch 0 \(tensor\(1, 32\) float32\): layer '/bn_in/BatchNormalization' "
                                             "\\(BatchNormalization\\) gets 1 value per channel"):
        recompute_stats(mlp, [torch.ones(1, 32)], progress=False)
    with pytest.raises(InputDataError, match="forward= is how a batch reaches a torch module"):
        recompute_stats(proto, [good], forward=lambda m, b: m(b), progress=False)
    with pytest.raises(InputDataError, match="feed= is how a batch reaches a torch module"):
        normfx.rewrite(proto, "precise", data=[good], feed=lambda m, b: m(b))

    def broken():
        yield good
        raise OSError("disk gone")

    with pytest.raises(InputDataError, match="while producing batch 1: disk gone"):
        recompute_stats(proto, broken(), progress=False)
    with pytest.raises(ModelError, match="no BatchNormalization node named 'nope'"):
        collect_onnx_moments(proto, [good], ["nope"], progress=False)
    no_bn = Builder(0)
    no_bn.output(no_bn.node("Relu", [no_bn.input("x", ["N", 3])]), ["N", 3])
    with pytest.raises(ModelError, match="no BatchNormalization node"):
        recompute_stats(no_bn.model(), [np.ones((2, 3), np.float32)], progress=False)


# --- torch.distributed ------------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import datetime, sys
    import numpy as np, torch
    import torch.distributed as dist
    from onnx import numpy_helper
    from normfx.stats import recompute_stats

    rank, world, init_file, out_dir, model = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    batches = list(np.load(out_dir + "/batches.npz").values())[rank::world]
    out = recompute_stats(model, batches, progress=False)
    result = {"values": {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}}
    bad = batches if rank == 0 else batches[:1] + [np.zeros((2, 5, 32, 32), np.float32)]
    try:
        recompute_stats(model, bad, progress=False)
        result["failure"] = None
    except Exception as exc:
        result["failure"] = (type(exc).__name__, str(exc))
    torch.save(result, out_dir + "/rank%d.pt" % rank)
    dist.destroy_process_group()
    """
)


def test_two_gloo_ranks_equal_one_process_over_the_union(exported, tmp_path):
    """Under torch.distributed the ONNX route merges moments across ranks as the torch route does."""
    _, proto = exported("trap_shared_bn")
    path = tmp_path / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    batches = [b.numpy() for b in batches_for("trap_shared_bn", sizes=(6, 4, 6, 5, 3))]
    np.savez(tmp_path / "batches.npz", *batches)
    ranks = run_gloo_ranks(WORKER, tmp_path, extra_args=(str(path),))
    single = inits(recompute_stats(proto, batches, progress=False))
    assert ranks[0]["values"].keys() == single.keys()
    for key, value in single.items():
        assert np.array_equal(ranks[0]["values"][key], ranks[1]["values"][key]), key
        assert rel(value, ranks[0]["values"][key]) <= 1e-6 if value.size else True
    assert ranks[0]["failure"][0] == "RewriteError"
    assert ranks[1]["failure"][0] == "InputDataError" and "batch 1" in ranks[1]["failure"][1]
