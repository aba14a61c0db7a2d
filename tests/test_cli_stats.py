"""``normfx stats``: data files and factories, outputs (.pt/.json/plot) written atomically and never over
an input, the numbers equal to the library's, and errors as exit code 2 with one line on stderr."""

from __future__ import annotations

import argparse
import json
import os
import textwrap

import numpy as np
import pytest
import torch

from normfx import cli, cli_stats, models
from normfx.stats import recompute_stats, recompute_stats_with_report

MODEL = "conv1d"


@pytest.fixture
def normfx_main():
    """The real entry point, ``normfx.cli.main`` (``stats`` is one of its subcommands)."""
    return cli.main


@pytest.fixture
def inputs(tmp_path):
    x = np.random.RandomState(0).randn(20, *models.info(MODEL).input_shape).astype(np.float32) * 1.5 + 0.5
    path = tmp_path / "inputs.npy"
    np.save(path, x)
    return path, x


def library_stats(x: np.ndarray, batch_size: int, **kwargs) -> torch.nn.Module:
    batches = list(torch.split(torch.from_numpy(x), batch_size))
    return recompute_stats(models.create(MODEL), batches, progress=False, **kwargs)


def test_pt_output_loads_and_equals_the_library(normfx_main, inputs, tmp_path, capsys):
    path, x = inputs
    out, plot = tmp_path / "stats.pt", tmp_path / "drift.png"
    rc = normfx_main(["stats", "--model", MODEL, "--data", str(path), "--batch-size", "8",
                      "--out", str(out), "--plot", str(plot)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "shift max" in captured.out and "recomputed" in captured.out
    state = torch.load(out, weights_only=True)
    model = models.create(MODEL)
    model.load_state_dict(state)
    expected = library_stats(x, 8)
    bns = [n for n, m in expected.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 5
    for name, module in model.named_modules():
        if name in bns:
            assert torch.equal(module.running_mean, dict(expected.named_modules())[name].running_mean)
            assert torch.equal(module.running_var, dict(expected.named_modules())[name].running_var)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(tmp_path)) == ["drift.png", "inputs.npy", "stats.pt"]  # no temp files left


def test_json_output_adaptive_mode_and_num_batches(normfx_main, inputs, tmp_path, capsys):
    path, x = inputs
    out = tmp_path / "stats.json"
    rc = normfx_main(["stats", "--model", MODEL, "--data", str(path), "--batch-size", "8", "--num-batches", "2",
                      "--mode", "adaptive", "--out", str(out), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert rc == 0
    saved = json.loads(out.read_text())
    assert saved["mode"] == "adaptive" and printed["mode"] == "adaptive"
    assert saved["diagnosis"]["batches"] == 2 and saved["report"]["summary"]["applied"] == 5
    batches = list(torch.split(torch.from_numpy(x[:16]), 8))
    expected, report = recompute_stats_with_report(models.create(MODEL), batches, mode="adaptive", progress=False)
    modules = dict(expected.named_modules())
    assert set(saved["statistics"]) == {e.name for e in report.applied}
    for entry in report.applied:
        values = saved["statistics"][entry.name]
        assert np.array_equal(np.float32(values["running_var"]), modules[entry.name].running_var.numpy())
        assert np.array_equal(np.float32(values["running_mean"]), modules[entry.name].running_mean.numpy())
        assert values["count"] == entry.details["count"] and values["calls"] == 2
    assert {e["status"] for e in saved["report"]["entries"]} == {"applied"}


def test_npz_dict_batches_and_factories(normfx_main, tmp_path, monkeypatch, capsys):
    (tmp_path / "userdefs.py").write_text(textwrap.dedent(
        """
        import torch
        from torch import nn

        class TwoInputs(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3)
                self.bn = nn.BatchNorm2d(4)

            def forward(self, image, offset):
                return self.bn(self.conv(image) + offset.view(-1, 1, 1, 1))

        def build():
            torch.manual_seed(0)
            return TwoInputs().eval()

        def batches():
            g = torch.Generator().manual_seed(1)
            return [{"image": torch.randn(4, 3, 8, 8, generator=g), "offset": torch.randn(4, generator=g)} for _ in range(3)]
        """
    ))
    monkeypatch.chdir(tmp_path)
    g = np.random.RandomState(1)
    np.savez(tmp_path / "multi.npz", image=g.randn(10, 3, 8, 8), offset=g.randn(10))  # float64: cast to float32
    rc = normfx_main(["stats", "--model", "userdefs:build", "--data", "multi.npz", "--batch-size", "4", "--out", "a.json"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "a.json").read_text())["diagnosis"]["batches"] == 3
    rc = normfx_main(["stats", "--model", "userdefs:build", "--data", "userdefs:batches", "--out", "b.json"])
    assert rc == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["statistics"]["bn"]["count"] == 3 * 4 * 36


def run_error(normfx_main, argv, capsys) -> str:
    rc = normfx_main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("normfx stats: error:")
    return err


def test_errors_exit_2_with_one_line_and_leave_files_alone(normfx_main, inputs, tmp_path, capsys):
    path, _ = inputs
    original = path.read_bytes()
    weights = tmp_path / "weights.pt"
    torch.save(models.create(MODEL).state_dict(), weights)
    saved_weights = weights.read_bytes()
    err = run_error(normfx_main, ["stats", "--model", MODEL, "--weights", str(weights), "--data", str(path),
                                  "--out", str(weights)], capsys)
    assert "is the input file" in err and weights.read_bytes() == saved_weights
    err = run_error(normfx_main, ["stats", "--model", MODEL, "--data", str(path), "--out", str(path)], capsys)
    assert "--out" in err
    err = run_error(normfx_main, ["stats", "--model", MODEL, "--data", str(path), "--out", str(tmp_path / "s.txt")], capsys)
    assert ".pt" in err and ".json" in err
    run_error(normfx_main, ["stats", "--model", MODEL, "--data", str(tmp_path / "missing.npy")], capsys)
    err = run_error(normfx_main, ["stats", "--model", MODEL, "--data", "inputs.csv"], capsys)
    assert "module:factory" in err
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    assert "cannot read" in run_error(normfx_main, ["stats", "--model", MODEL, "--data", str(tmp_path / "broken.npy")], capsys)
    (tmp_path / "model.onnx").write_bytes(b"")
    assert "ONNX" in run_error(normfx_main, ["stats", "--model", str(tmp_path / "model.onnx"), "--data", str(path)], capsys)
    # wrong shape: the previous output stays as it was, and no temp file is left
    out = tmp_path / "stats.json"
    out.write_text("previous")
    np.save(tmp_path / "wrong.npy", np.zeros((4, 3, 64, 64), np.float32))
    err = run_error(normfx_main, ["stats", "--model", MODEL, "--data", str(tmp_path / "wrong.npy"), "--out", str(out)], capsys)
    assert "batch 0" in err and "(4, 3, 64, 64)" in err
    assert out.read_text() == "previous"
    # a batch of one sample for BatchNorm1d after global pooling... here conv1d keeps a length axis; use the mlp
    np.save(tmp_path / "one.npy", np.ones((1, 32), np.float32))
    err = run_error(normfx_main, ["stats", "--model", "mlp", "--data", str(tmp_path / "one.npy")], capsys)
    assert "1 value per channel" in err
    np.save(tmp_path / "empty.npy", np.zeros((0, 32), np.float32))
    assert "no batches" in run_error(normfx_main, ["stats", "--model", "mlp", "--data", str(tmp_path / "empty.npy")], capsys)
    assert path.read_bytes() == original
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_run_can_be_called_with_parsed_args(inputs, capsys):
    path, _ = inputs
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli_stats.add_parser(sub)
    args = parser.parse_args(["stats", "--model", MODEL, "--data", str(path), "--batch-size", "10"])
    assert args.func is cli_stats.run
    assert cli_stats.run(args) == 0
    assert "2 batch(es)" in capsys.readouterr().out
