"""``normfx rewrite`` and ``normfx stats`` on ONNX models: --data, --out written atomically (folders created,
never over the input, nothing on failure), the numbers equal to the library's, exit codes and one-line errors."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import normfx
from normfx import models, policy
from normfx.cli import main
from normfx.export import export_onnx

MODEL = "conv1d"


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *argv, code: int = 2) -> str:
    rc, _, err = run_cli(capsys, *argv)
    assert rc == code, err
    assert err.count("\n") == 1 and ": error: " in err, err
    return err


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture
def files(tmp_path):
    """An unfused conv1d export (BN kept) and 20 samples of data beside it."""
    path = tmp_path / "model.onnx"
    model = models.create(MODEL, seed=1)
    path.write_bytes(export_onnx(model, (models.example_input(MODEL, batch=2),)).SerializeToString())
    x = (np.random.RandomState(0).randn(20, *models.info(MODEL).input_shape) * 1.5 + 0.5).astype(np.float32)
    data = tmp_path / "data.npy"
    np.save(data, x)
    return path, data, x


def test_rewrite_adaptive_writes_the_library_result(files, tmp_path, capsys):
    path, data, x = files
    before = path.read_bytes()
    out = tmp_path / "new" / "deeper" / "adapted.onnx"
    rc, stdout, err = run_cli(capsys, "rewrite", "--model", path, "--policy", "adaptive", "--data", data,
                              "--batch-size", "8", "--out", out)
    assert rc == 0, err
    assert "5 applied, 0 skipped" in stdout and "not enforced" in stdout and f"wrote {out}" in stdout
    assert path.read_bytes() == before
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    expected = normfx.rewrite(str(path), "adaptive", data=list(torch.split(torch.from_numpy(x), 8)))
    assert written.SerializeToString() == expected.SerializeToString()
    assert sorted(os.listdir(out.parent)) == ["adapted.onnx"]  # no temp file left

    rc, stdout, err = run_cli(capsys, "rewrite", "--model", path, "--policy", "precise", "--data", data,
                              "--batch-size", "8", "--num-batches", "1", "--json")
    payload = json.loads(stdout)
    assert rc == 0 and payload["exact"] is False and payload["out"] is None
    assert {e["details"]["batches"] for e in payload["report"]["entries"]} == {1}
    _, report = normfx.rewrite_with_report(str(path), "precise", data=[torch.from_numpy(x[:8])])
    assert [e["details"]["count"] for e in payload["report"]["entries"]] == [e.details["count"] for e in report.entries]


def test_rewrite_exact_policy_on_onnx_is_verified_and_written(files, tmp_path, capsys):
    path, _, _ = files
    out = tmp_path / "fused.onnx"
    rc, stdout, err = run_cli(capsys, "rewrite", "--model", path, "--policy", "fuse", "--out", out, "--json")
    payload = json.loads(stdout)
    assert rc == 0, err
    assert payload["exact"] and payload["verification"]["ok"] and payload["out"] == str(out)
    assert payload["verification"]["max_rel_error"] <= 1e-5
    assert not [n for n in onnx.load(str(out)).graph.node if n.op_type == "BatchNormalization"]


def test_a_failed_exact_verification_exits_1_and_writes_nothing(files, tmp_path, capsys, monkeypatch):
    path, _, _ = files

    def corrupt(model, ctx):  # an "exact" policy that is not: scales the first initializer
        first = model.graph.initializer[0]
        first.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(first) * 2, first.name))
        return model

    monkeypatch.setitem(policy._REGISTRY, "corrupt", policy.PolicySpec("corrupt", "test", onnx_pass=corrupt))
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")
    rc, stdout, _ = run_cli(capsys, "rewrite", "--model", path, "--policy", "corrupt", "--out", out)
    assert rc == 1 and "FAILED" in stdout and "nothing written" in stdout
    assert out.read_bytes() == b"previous"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_rewrite_refusals_exit_2_with_one_line(files, tmp_path, capsys):
    path, data, _ = files
    before = path.read_bytes()
    err = one_line_error(capsys, "rewrite", "--model", path, "--policy", "adaptive", "--data", data, "--out", path)
    assert "is the input file" in err
    link = tmp_path / "link.onnx"
    link.symlink_to(path)
    assert "is the input file" in one_line_error(capsys, "rewrite", "--model", path, "--policy", "fuse", "--out", link)
    assert "is the input file" in one_line_error(capsys, "rewrite", "--model", path, "--policy", "adaptive",
                                                 "--data", data, "--out", data)
    assert "is a folder" in one_line_error(capsys, "rewrite", "--model", path, "--policy", "fuse", "--out", tmp_path)
    err = one_line_error(capsys, "rewrite", "--model", MODEL, "--policy", "fuse", "--out", tmp_path / "x.onnx")
    assert "normfx export" in err and "torch model" in err
    assert "needs calibration data" in one_line_error(capsys, "rewrite", "--model", path, "--policy", "precise")
    # data that does not fit: the previous output stays, no temp file, the input untouched
    out = tmp_path / "sub" / "out.onnx"
    np.save(tmp_path / "wrong.npy", np.zeros((4, 2, 2048), np.float32))
    err = one_line_error(capsys, "rewrite", "--model", path, "--policy", "adaptive", "--data", tmp_path / "wrong.npy",
                         "--out", out)
    assert "batch 0: input 'input' expects shape [batch, 1, 2048] but the batch has shape [4, 2, 2048]" in err
    assert not out.parent.exists()
    assert "--num-batches" in one_line_error(capsys, "rewrite", "--model", path, "--policy", "precise", "--data", data,
                                             "--num-batches", "-1")
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["data.npy", "link.onnx", "model.onnx", "wrong.npy"]


def test_rewrite_torch_model_takes_data(capsys, tmp_path):
    x = np.random.RandomState(1).randn(12, 32).astype(np.float64)  # float64: cast to the model's float32
    np.save(tmp_path / "mlp.npy", x)
    rc, stdout, err = run_cli(capsys, "rewrite", "--model", "mlp", "--policy", "precise", "--data", tmp_path / "mlp.npy",
                              "--batch-size", "4", "--json")
    assert rc == 0, err
    payload = json.loads(stdout)
    assert payload["report"]["summary"] == {"applied": 4, "skipped": 0, "kept": 0}
    assert payload["report"]["entries"][0]["details"]["batches"] == 3


def test_explain_on_onnx_says_what_precise_would_do(files, capsys):
    path, _, _ = files
    rc, stdout, _ = run_cli(capsys, "explain", "--model", path, "--policy", "precise", "--json")
    assert rc == 0
    entries = json.loads(stdout)["entries"]
    assert len(entries) == 5 and all(e["reason"].startswith("would recompute precise statistics") for e in entries)


def test_stats_on_onnx_writes_json_equal_to_the_library(files, tmp_path, capsys):
    path, data, x = files
    out = tmp_path / "stats.json"
    rc, stdout, err = run_cli(capsys, "stats", "--model", path, "--data", data, "--batch-size", "8",
                              "--mode", "adaptive", "--out", out)
    assert rc == 0, err
    assert "shift max" in stdout and "5 layer(s) recomputed" in stdout
    saved = json.loads(out.read_text())
    expected = normfx.rewrite(str(path), "adaptive", data=list(torch.split(torch.from_numpy(x), 8)))
    values = inits(expected)
    nodes = {n.name: n for n in expected.graph.node if n.op_type == "BatchNormalization"}
    assert set(saved["statistics"]) == set(nodes) and saved["diagnosis"]["batches"] == 3
    for name, entry in saved["statistics"].items():
        assert np.array_equal(np.float32(entry["running_mean"]), values[nodes[name].input[3]])
        assert np.array_equal(np.float32(entry["running_var"]), values[nodes[name].input[4]])
        assert entry["calls"] == 3 and entry["eps"] == pytest.approx(1e-5)
    err = one_line_error(capsys, "stats", "--model", path, "--data", data, "--out", tmp_path / "stats.pt")
    assert ".pt" in err and "stats.json" in err
    assert not (tmp_path / "stats.pt").exists()
