"""``normfx export`` / ``check`` / ``bench``: outputs, exit codes, and nothing lost on bad input."""

import json
import os

import numpy as np
import onnx
import pytest

from normfx import models
from normfx.cli import main
from normfx.export import export_onnx
from normfx.runtime import available_providers


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def plain_onnx(tmp_path_factory):
    """An unfused export of the unet (ConvTranspose + BN), BN nodes kept."""
    folder = tmp_path_factory.mktemp("plain")
    path = folder / "unet.onnx"
    path.write_bytes(export_onnx(models.create("unet"), (models.example_input("unet"),)).SerializeToString())
    return path


def files_in(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_export_zoo_model_writes_model_and_report(tmp_path, capsys):
    out, report = tmp_path / "r18.onnx", tmp_path / "r18.json"
    code, stdout, _ = run_cli(capsys, "export", "--model", "resnet18", "--policy", "fuse", "--out", out,
                              "--report", report, "--opset", "17", "--runs", "3")
    assert code == 0, stdout
    assert "BatchNormalization nodes left: 0" in stdout and "ratio" in stdout
    payload = json.loads(report.read_text())
    assert payload["batchnorm_left"] == 0 and payload["verification"]["ok"]
    assert payload["verification"]["max_rel_error"] <= 1e-5
    assert payload["latency"]["ratio"] > 0
    assert onnx.load(str(out)).opset_import[0].version == 17
    assert files_in(tmp_path) == ["r18.json", "r18.onnx"]


def test_export_onnx_file_and_module_factory(tmp_path, capsys, plain_onnx, monkeypatch):
    before = plain_onnx.read_bytes()
    out = tmp_path / "fused.onnx"
    code, stdout, _ = run_cli(capsys, "export", "--model", plain_onnx, "--out", out, "--runs", "0")
    assert code == 0 and "BatchNormalization nodes left: 0" in stdout
    assert plain_onnx.read_bytes() == before  # the input is untouched

    (tmp_path / "userfactory.py").write_text(
        "from normfx import models\n"
        "def build():\n"
        "    return models.create('conv1d'), models.example_input('conv1d', batch=2)\n"
    )
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_cli(capsys, "export", "--model", "userfactory:build", "--out", tmp_path / "c1.onnx", "--runs", "0")
    assert code == 0, err
    assert (tmp_path / "c1.onnx").is_file()


def test_export_help_says_factories_run_code(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "IMPORTS AND RUNS" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "truncated", "not_onnx", "same_path", "unknown_policy", "verification"])
def test_export_bad_input_one_line_exit_code_and_nothing_lost(tmp_path, capsys, plain_onnx, case):
    source = tmp_path / "in.onnx"
    good = plain_onnx.read_bytes()
    out = tmp_path / "out.onnx"
    args = ["export", "--model", source, "--out", out, "--runs", "0"]
    expected_code, message = 2, ""
    if case == "missing":
        message = "does not exist"
    elif case == "truncated":
        source.write_bytes(good[: len(good) // 3])
        message = "in.onnx"
    elif case == "not_onnx":
        source.write_text("this is not a model\n")
        message = "in.onnx"
    elif case == "same_path":
        source.write_bytes(good)
        args = ["export", "--model", source, "--out", source, "--runs", "0"]
        message = "is the input file"
    elif case == "unknown_policy":
        source.write_bytes(good)
        args += ["--policy", "fusee"]
        message = "unknown policy 'fusee'"
    elif case == "verification":
        source.write_bytes(good)
        args += ["--rtol", "0", "--atol", "0"]  # rounding alone fails a zero tolerance
        expected_code, message = 1, "not equivalent"
    before = source.read_bytes() if source.exists() else None
    code, _, err = run_cli(capsys, *args)
    assert code == expected_code
    assert message in err and len(err.strip().splitlines()) == 1
    assert (source.read_bytes() if source.exists() else None) == before
    assert not out.exists()
    assert files_in(tmp_path) == (["in.onnx"] if before is not None else [])


def test_check_exit_codes(tmp_path, capsys, plain_onnx):
    fused = tmp_path / "fused.onnx"
    assert run_cli(capsys, "export", "--model", plain_onnx, "--out", fused, "--runs", "0")[0] == 0
    code, out, _ = run_cli(capsys, "check", plain_onnx, fused)
    assert code == 0 and "equivalent" in out

    x = models.example_input("unet", batch=3, seed=7).numpy()
    np.savez(tmp_path / "x.npz", input=x)
    code, out, _ = run_cli(capsys, "check", plain_onnx, fused, "--inputs", tmp_path / "x.npz", "--json")
    assert code == 0 and json.loads(out)["outputs"][0]["shape"][0] == 3

    other = tmp_path / "other.onnx"
    other.write_bytes(export_onnx(models.create("unet", seed=9), (models.example_input("unet"),)).SerializeToString())
    code, out, _ = run_cli(capsys, "check", plain_onnx, other)
    assert code == 1 and "NOT equivalent" in out and "max rel error" in out

    code, _, err = run_cli(capsys, "check", plain_onnx, tmp_path / "missing.onnx")
    assert code == 2 and "does not exist" in err
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage")
    code, _, err = run_cli(capsys, "check", plain_onnx, tmp_path / "junk.onnx")
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_bench_reports_latency_and_ratio(tmp_path, capsys, plain_onnx):
    fused = tmp_path / "fused.onnx"
    assert run_cli(capsys, "export", "--model", plain_onnx, "--out", fused, "--runs", "0")[0] == 0
    code, out, _ = run_cli(capsys, "bench", fused, "--baseline", plain_onnx, "--runs", "5", "--json")
    payload = json.loads(out)
    assert code == 0 and payload["model"]["runs"] == 5 and payload["ratio"] > 0
    code, _, err = run_cli(capsys, "bench", fused, "--provider", "cuda", "--runs", "1")
    if "cuda" in available_providers():
        assert code == 0
    else:
        assert code == 2 and "not available" in err


def test_user_code_errors_and_int_inputs(tmp_path, capsys, monkeypatch):
    (tmp_path / "userf.py").write_text(
        "import torch\n"
        "def broken():\n"
        "    raise RuntimeError('boom')\n"
        "class Tokens(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.emb = torch.nn.Embedding(10, 8)\n"
        "        self.fc = torch.nn.Linear(8, 4)\n"
        "        self.bn = torch.nn.BatchNorm1d(4)\n"
        "    def forward(self, t):\n"
        "        return self.bn(self.fc(self.emb(t).mean(1)))\n"
        "def tokens():\n"
        "    m = Tokens().eval()\n"
        "    with torch.no_grad():\n"
        "        m.bn.running_mean.normal_(); m.bn.running_var.uniform_(0.5, 2)\n"
        "    return m, torch.randint(0, 10, (2, 5))\n"
    )
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "export", "--model", "userf:broken", "--out", tmp_path / "o.onnx", "--runs", "0")
    assert code == 2 and "userf:broken() raised RuntimeError: boom" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "export", "--model", "nosuchmodule:build", "--out", tmp_path / "o.onnx")
    assert code == 2 and "cannot import 'nosuchmodule'" in err
    code, out, err = run_cli(capsys, "export", "--model", "userf:tokens", "--out", tmp_path / "t.onnx", "--runs", "0")
    assert code == 0, err
    assert "BatchNormalization nodes left: 0" in out


def test_check_with_wrongly_named_inputs_exits_2(tmp_path, capsys, plain_onnx):
    np.savez(tmp_path / "x.npz", image=models.example_input("unet").numpy())
    code, _, err = run_cli(capsys, "check", plain_onnx, plain_onnx, "--inputs", tmp_path / "x.npz")
    assert code == 2 and "do not match the model's inputs input" in err


def test_written_files_get_normal_permissions(tmp_path, capsys, plain_onnx):
    out = tmp_path / "fused.onnx"
    assert run_cli(capsys, "export", "--model", plain_onnx, "--out", out, "--runs", "0")[0] == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
