"""The command line's outcomes, not only its exit codes: what `rewrite --out` writes loads and computes what the
library computes, weights given with --weights are really used, explain agrees with what rewrite changed, bench
ratios are sane, outputs get folders and normal modes, benchmarks and examples write to out/ by default."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import normfx
from normfx import models
from normfx.cli import main
from normfx.errors import ModelError

REPO = Path(__file__).resolve().parent.parent


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def ort_outputs(path, x: torch.Tensor) -> np.ndarray:
    from normfx.runtime import make_session

    session = make_session(str(path), optimization="disable")
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# --- rewrite --out for torch models -------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["frozen", "precise"])
def test_rewrite_out_state_dict_loads_and_equals_the_library(policy, tmp_path, capsys):
    x = models.example_input("resnet18", batch=4)
    data = tmp_path / "data.npy"
    np.save(data, torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1)).numpy())
    out = tmp_path / "made" / "for" / f"{policy}.pt"
    code, stdout, err = run_cli(capsys, "rewrite", "--model", "resnet18", "--policy", policy, "--data", data, "--out", out)
    assert code == 0, err
    assert f"wrote {out} (state_dict" in stdout
    batches = list(torch.from_numpy(np.load(data)).split(32))
    library = normfx.rewrite(models.create("resnet18").eval(), policy, data=batches).eval()
    fresh = models.create("resnet18", seed=9).eval()  # other weights: only the file makes it equal
    fresh.load_state_dict(torch.load(out, weights_only=True))
    with torch.no_grad():
        assert rel(fresh(x), library(x)) <= 1e-6
        if policy == "precise":  # new statistics: not the original model's function
            assert rel(fresh(x), models.create("resnet18").eval()(x)) > 1e-3


def test_rewrite_out_torch_export_program_for_a_changed_structure(tmp_path, capsys):
    out = tmp_path / "fused.pt2"
    code, stdout, err = run_cli(capsys, "rewrite", "--model", "resnet18", "--policy", "fuse", "--out", out)
    assert code == 0, err
    assert "torch.export program" in stdout
    program = torch.export.load(str(out)).module()
    x = models.example_input("resnet18")
    library = normfx.rewrite(models.create("resnet18").eval(), "fuse", example_inputs=x)
    with torch.no_grad():
        assert rel(program(x), library(x)) <= 1e-6
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in program.modules())
    code, _, err = run_cli(capsys, "rewrite", "--model", "resnet18", "--policy", "fuse", "--out", tmp_path / "fused.pt")
    assert code == 2 and "changes the module structure" in err and not (tmp_path / "fused.pt").exists()
    code, _, err = run_cli(capsys, "rewrite", "--model", "resnet18", "--policy", "fuse", "--out", tmp_path / "fused.onnx")
    assert code == 2 and "normfx export" in err


# --- weights really loaded, explain agrees with rewrite ------------------------------------------------------


def test_export_with_weights_computes_what_the_weights_compute(tmp_path, capsys):
    weighted = models.create("conv1d", seed=4).eval()
    torch.save(weighted.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "w.onnx"
    code, _, err = run_cli(capsys, "export", "--model", "conv1d", "--weights", tmp_path / "w.pt", "--out", out, "--runs", "0")
    assert code == 0, err
    x = models.example_input("conv1d", batch=2, seed=3)
    with torch.no_grad():
        expected, default = weighted(x).numpy(), models.create("conv1d").eval()(x).numpy()
    assert rel(ort_outputs(out, x), expected) <= 1e-5
    assert rel(ort_outputs(out, x), default) > 1e-2  # not the zoo's own weights
    library = tmp_path / "library.onnx"
    normfx.export(weighted, models.example_input("conv1d"), str(library))
    assert rel(ort_outputs(out, x), ort_outputs(library, x)) <= 1e-6


@pytest.mark.parametrize("policy", ["fuse", "frozen"])
def test_explain_entries_agree_with_what_rewrite_changed(policy, capsys):
    code, out, _ = run_cli(capsys, "explain", "--model", "resnet18", "--policy", policy, "--json")
    assert code == 0
    entries = json.loads(out)["entries"]
    applied = {e["name"] for e in entries if e["status"] == "applied"}
    model = models.create("resnet18").eval()
    bns = {name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert applied == bns
    result = normfx.rewrite(model, policy, example_inputs=models.example_input("resnet18"))
    left = {name for name, m in result.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert left == set()
    if policy == "frozen":
        frozen = {name for name, m in result.named_modules() if type(m).__name__ == "FrozenBatchNorm2d"}
        assert frozen == applied


def test_frozen_explain_lists_functional_batch_norm_calls(capsys):
    code, out, _ = run_cli(capsys, "explain", "--model", "trap_functional_bn", "--policy", "frozen", "--json")
    entries = json.loads(out)["entries"]
    functional = [e for e in entries if e.get("details", {}).get("source") == "F.batch_norm" or "functional" in e["reason"]]
    assert code == 0 and len(functional) == 2
    assert all(e["status"] == "kept" and "functional batch_norm call" in e["reason"] for e in functional)
    model, x = models.create("trap_functional_bn").eval(), models.example_input("trap_functional_bn")
    with torch.no_grad():
        assert rel(normfx.rewrite(model, "frozen")(x), model(x)) <= 1e-6


# --- export: folders, JSON report, ONNX route in words ---------------------------------------------------------


def test_export_creates_folders_and_reports_both_batch_sizes(tmp_path, capsys):
    out, report = tmp_path / "build" / "model.onnx", tmp_path / "build" / "report.json"
    code, stdout, err = run_cli(capsys, "export", "--model", "conv1d", "--out", out, "--report", report, "--runs", "0")
    assert code == 0, err
    assert "ONNX route:\nnothing to do: the exported graph has no normalization node left" in stdout
    assert "layer  rule  status" not in stdout.split("ONNX route:")[1]
    payload = json.loads(report.read_text())
    assert payload["verification"]["ok"] and payload["verification"]["outputs"][0]["shape"][0] == 1
    extra = payload["extra_checks"]
    assert extra[0]["check"] == "at another batch size" and extra[0]["outputs"][0]["shape"][0] == 2 and extra[0]["ok"]
    assert "verification at another batch size: OK" in stdout
    onnx.checker.check_model(onnx.load(str(out)))


def test_failed_write_removes_the_folders_it_made(tmp_path, monkeypatch):
    from normfx.io_utils import atomic_write_bytes

    def boom(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "a" / "b" / "c.bin", b"data")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_every_output_gets_0666_less_the_umask(umask, tmp_path, capsys):
    old = os.umask(umask)
    try:
        code, _, err = run_cli(capsys, "rewrite", "--model", "conv1d", "--policy", "frozen", "--out", tmp_path / "f.pt")
        assert code == 0, err
        normfx.diagnose_ema(models.create("conv1d").eval(), [models.example_input("conv1d", batch=4)],
                            plot=str(tmp_path / "drift.png"))
        normfx.export(models.create("conv1d").eval(), models.example_input("conv1d"), str(tmp_path / "x" / "m.onnx"))
    finally:
        os.umask(old)
    for name in ("f.pt", "drift.png", "x/m.onnx"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


# --- onnxruntime messages -------------------------------------------------------------------------------------


def test_onnxruntime_errors_keep_their_details_on_one_line():
    from normfx.runtime import ort_message

    error = RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: input for the "
                         "following indices\n index: 2 Got: 32 Expected: 64\n Please fix either the inputs/outputs or the model.")
    text = ort_message(error)
    assert "\n" not in text and "index: 2 Got: 32 Expected: 64" in text


def test_an_old_opset_names_the_supported_ones(tmp_path):
    from normfx.export import export_onnx
    from normfx.runtime import make_session

    old = export_onnx(models.create("conv1d").eval(), (models.example_input("conv1d"),), opset=6)
    with pytest.raises(ModelError, match=r"opset 6; normfx supports opsets 7 to 23: export with --opset 7 or later"):
        make_session(old)


# --- bench ratios, benchmark and example outputs -----------------------------------------------------------------


def test_bench_ratio_of_a_model_against_itself_is_near_one(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    normfx.export(models.create("conv1d").eval(), models.example_input("conv1d"), str(model))
    code, out, err = run_cli(capsys, "bench", model, "--baseline", model, "--runs", "30", "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert 0.5 <= payload["ratio"] <= 2.0
    assert 0 < payload["model"]["min_ms"] <= payload["model"]["median_ms"] <= payload["model"]["p90_ms"]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_benchmark_writes_to_out_by_default_stamped_with_its_commit(tmp_path, monkeypatch, capsys):
    committed = _digest(REPO / "benchmarks" / "results")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_fx_fuse

    assert bench_fx_fuse.main(["--models", "mlp,conv1d", "--repeats", "1", "--runs", "3", "--batch", "2"]) == 0
    result = json.loads((tmp_path / "out" / "benchmarks" / "fx_fuse.json").read_text())
    assert result["measures"] == sorted(bench_fx_fuse.MEASURES) and "normfx/passes/fx" in result["measures"]
    assert result["commit"] is None or len(result["commit"]) == 40
    for row in result["rows"]:  # sane: same folds or more, exact, ratios within two orders of magnitude
        assert row["normfx_folded"] >= row["fx_fuse_folded"] and row["normfx_rel_error"] <= 1e-5
        assert 0.01 < row["pass_time_ratio"] < 100 and 0.01 < row["latency_ratio"] < 100
    summary = result["summary"]
    assert summary["pass_time_ratio_max_model"] in {"mlp", "conv1d"}
    assert _digest(REPO / "benchmarks" / "results") == committed
    for script in ("bench_onnx", "bench_proxynorm", "bench_stats"):
        module = __import__(script)
        assert all((REPO / path).exists() for path in module.MEASURES), script


def test_examples_default_to_out_and_fix_their_threads():
    for name in ("digits_precise_bn", "digits_unfuse", "digits_proxynorm"):
        text = (REPO / "examples" / f"{name}.py").read_text()
        assert 'DEFAULT_OUT = os.path.join("out", "examples")' in text and "default=DEFAULT_OUT" in text, name
        assert "use_deterministic_algorithms(True)" in text and "set_num_threads(args.threads)" in text, name


def test_run_sh_forwards_to_the_cli_and_readme_says_how():
    done = subprocess.run(["bash", str(REPO / "run.sh"), "no-such-job"], capture_output=True, text=True)
    assert done.returncode == 2 and "normfx ARGS" in done.stderr
    readme = (REPO / "README.md").read_text()
    assert "./run.sh normfx" in readme and ".venv/bin/normfx" in readme and "source .venv/bin/activate" in readme

